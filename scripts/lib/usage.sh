# Sourced by the user-facing scripts. `help_if_asked SCRIPT USAGE "$@"`: when an argument is
# --help or -h, print USAGE, the script's header comment and its knobs, then exit 0 before
# anything runs (no set-up, no venv, no output files). The knobs are read from the script's
# own `VAR=${VAR:-default}  # note` lines, so the help shows the defaults it really uses.
help_if_asked() {
    local script=$1 usage=$2 arg
    shift 2
    for arg in "$@"; do
        if [ "$arg" = --help ] || [ "$arg" = -h ]; then
            echo "usage: $usage"
            awk '
                NR == 1 { next }
                /^#/ && !body { sub(/^# ?/, ""); print; next }
                { body = 1 }
                match($0, /^[A-Za-z_][A-Za-z0-9_]*=\$\{/) {
                    name = substr($0, 1, index($0, "=") - 1)
                    rest = substr($0, RLENGTH + 1)
                    if (index(rest, name ":-") != 1) next
                    rest = substr(rest, length(name) + 3)
                    note = ""
                    if (match(rest, /\}[ \t]+#[ \t]*/)) { note = substr(rest, RSTART + RLENGTH); rest = substr(rest, 1, RSTART) }
                    sub(/\}[ \t]*$/, "", rest)
                    if (!shown++) print "\nknobs (environment variables; default after =):"
                    line = sprintf("  %s=%s", name, rest)
                    if (note != "") line = sprintf("%-33s  %s", line, note)
                    print line
                }
            ' "$script"
            exit 0
        fi
    done
}
