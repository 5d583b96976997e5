"""One-line errors for bad input, and the wrapper every CLI runs under."""

import errno
import sys

# OS errors that are the environment's, not a bug: disk full, no permission, read-only, bad names.
# Reported in one line; the atomic writers have already removed their temporaries.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                      errno.ENOTDIR, errno.EISDIR}


# A run that stopped on purpose to be resumed (EX_TEMPFAIL): train_kd.py --stop_at, reproduce.py --stop_after.
PAUSED_EXIT = 75


class UserError(Exception):
    """A problem with the user's input (file, field or flag), reported in one line."""


def os_error_message(err: OSError, what: str = "cannot write") -> str:
    """``cannot write PATH: No space left on device (disk full)``."""
    hint = {errno.ENOSPC: " (disk full)", errno.EDQUOT: " (quota exceeded)", errno.EROFS: " (read-only file system)"}
    return f"{what} {err.filename or ''}: {err.strerror or err}{hint.get(err.errno, '')}"


def run_cli(main, argv=None):
    """Run ``main(argv)``; turn a UserError into ``error: ...`` and exit status 2.

    ``--debug`` anywhere on the command line shows the full traceback instead. An OS error of
    the environment (disk full, permission denied, read-only, name too long) is one line too.
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
    except OSError as err:
        if debug or err.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {os_error_message(err, 'cannot access' if err.errno == errno.EACCES else 'cannot write')}",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
