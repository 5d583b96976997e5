"""Guards around a stage's output, all run before any model loads.

- ``OutputLock``: one run per output. An exclusive ``flock`` on ``<output>.lock``, held for the
  run's life; the OS drops it when the process dies, so a crash never leaves a stale lock. The
  file names its holder (pid, host, command line) for the error the second run prints.
  Creating the lock file is also the writability check of the output folder.
- ``refuse_output_is_input``: an output that is (resolves to) one of the inputs.
- ``check_output_kind``: an existing folder where a file goes, or a file where a folder goes.
- ``fit_name``: file names that would exceed the file system's limit, shortened with a hash.
"""

import atexit
import contextlib
import fcntl
import functools
import hashlib
import os
import socket
import sys

from .errors import UserError, os_error_message

NAME_MAX = 255
# Room for what is appended to an output's name: temporaries (.{name}.{pid}.partial.old),
# .lock, .config.json, .summary.json, .position_counts.json.
NAME_RESERVE = 64


def fit_name(name: str) -> str:
    """``name`` itself when short enough, else its head plus a hash of the whole (deterministic)."""
    limit = NAME_MAX - NAME_RESERVE
    encoded = name.encode()
    if len(encoded) <= limit:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    head = encoded[: limit - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


def check_name_length(path: str) -> None:
    base = os.path.basename(os.path.normpath(path))
    if len(base.encode()) > NAME_MAX - NAME_RESERVE:
        raise UserError(f"{path}: file name too long ({len(base.encode())} bytes; at most "
                        f"{NAME_MAX - NAME_RESERVE}, which leaves room for temporaries); choose a shorter name")


def same_path(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file or folder (through symlinks and relative paths)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_output_is_input(outputs: dict, inputs: dict) -> None:
    """``{"--output": path}`` vs ``{"--oracle": path}``: refuse an output that would replace an input."""
    for out_flag, out in outputs.items():
        for in_flag, inp in inputs.items():
            if out and inp and same_path(out, inp):
                raise UserError(f"{out_flag} {out} is the same file as {in_flag} {inp}: the run would replace "
                                f"its own input; choose another output")


def check_output_kind(path: str, folder: bool) -> None:
    """An output file must not be an existing folder, nor an output folder an existing file."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: exists and is a file, but the output here is a folder")
    if not folder and os.path.isdir(path):
        raise UserError(f"{path}: is a folder, but the output here is a file; give a file name")
    check_name_length(path)


def _make_parents(folder: str) -> list[str]:
    """``os.makedirs`` that returns the folders it created (deepest last), as one-line errors."""
    created, missing = [], []
    current = os.path.abspath(folder)
    while not os.path.isdir(current):
        if os.path.lexists(current):
            raise UserError(f"{current}: exists and is a file, but the output needs a folder there")
        missing.append(current)
        current = os.path.dirname(current)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # another process made it meanwhile
            continue
        except OSError as err:
            _remove_empty(created)
            raise UserError(os_error_message(err, "cannot create the folder")) from err
        created.append(path)
    return created


def _remove_empty(folders: list[str]) -> None:
    for path in reversed(folders):
        try:
            os.rmdir(path)  # only when empty: what the run wrote stays
        except OSError:
            pass


class OutputLock:
    """``with OutputLock(path):`` -- refuse, in one line, a second run writing ``path``.

    Parent folders the lock had to create are removed again on release if the run left them
    empty, so a run that fails early leaves nothing on disk.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.lock_path = self.path.rstrip(os.sep) + ".lock"
        self._fd = None
        self._created: list[str] = []

    def acquire(self) -> "OutputLock":
        check_name_length(self.path)
        self._created = _make_parents(os.path.dirname(os.path.abspath(self.lock_path)))
        try:
            while True:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
                    os.close(fd)
                    raise UserError(f"{self.path} is being written by another run ({holder}); wait for it to "
                                    f"finish or choose another output") from None
                # A run releasing its lock unlinks the file: make sure ours is still the one at the path.
                try:
                    if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
        except OSError as err:
            _remove_empty(self._created)
            raise UserError(os_error_message(err)) from err
        command = " ".join(sys.argv)[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still held: a waiting opener then retries on a fresh file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        _remove_empty(self._created)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


class OutputLocks:
    """Several ``OutputLock``s taken together (stage 4 writes one folder per model); all or none."""

    def __init__(self, paths):
        self.locks = [OutputLock(p) for p in dict.fromkeys(str(p) for p in paths)]

    def __enter__(self):
        taken = []
        try:
            for lock in self.locks:
                taken.append(lock.acquire())
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return self

    def __exit__(self, *exc):
        for lock in reversed(self.locks):
            lock.release()
        return False


_HELD: list = []  # one ExitStack per running ``releasing_locks`` call


def releasing_locks(main):
    """Decorator of a CLI ``main``: the outputs it claims stay locked until it returns or raises."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            _HELD.append(stack)
            try:
                return main(*args, **kwargs)
            finally:
                _HELD.pop()

    return wrapper


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and prove a file can be made there; leave nothing behind."""
    OutputLock(os.path.join(folder, ".pos2distill-write-check")).acquire().release()


def claim_output(path: str, inputs: dict = None, folder: bool = False, flag: str = "output") -> OutputLock:
    """Every check of one output before any model loads, then its lock (held by ``releasing_locks``).

    ``inputs``: ``{"--input-path": path}``, the files and folders the output must not be.
    """
    check_output_kind(path, folder)
    refuse_output_is_input({flag: path}, inputs or {})
    lock = OutputLock(path).acquire()
    if _HELD:
        _HELD[-1].callback(lock.release)
    else:  # called outside a decorated main: held until the process exits
        atexit.register(lock.release)
    return lock
