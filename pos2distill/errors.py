"""One-line errors for bad input, and the wrapper every CLI runs under."""

import sys


class UserError(Exception):
    """A problem with the user's input (file, field or flag), reported in one line."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; turn a UserError into ``error: ...`` and exit status 2.

    ``--debug`` anywhere on the command line shows the full traceback instead.
    """
    from .progress import quiet_library_bars

    quiet_library_bars()  # before main imports transformers or datasets
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
