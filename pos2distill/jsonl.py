"""Reading and atomically writing (optionally compressed) JSON-lines files.

Every output is written under a temporary name next to its final path
(``.{name}.{pid}.partial``) and renamed when complete, so a crash never
leaves a half-written file or folder under the final name. Compressed output
is reproducible: xopen writes gzip headers without a time stamp or file name.
"""

import json
import os
import re
import shutil
from typing import Iterable, Iterator

from xopen import xopen

from .errors import UserError

_FORMATS = {".gz": "gz", ".bz2": "bz2", ".xz": "xz", ".zst": "zst"}


def _compression(path: str):
    return _FORMATS.get(os.path.splitext(str(path))[1])


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; a bad line is a UserError naming file:line."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, expected a .jsonl[.gz] file")
    with xopen(path, "rt") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
        except (EOFError, OSError, UnicodeDecodeError) as err:
            # A truncated or corrupt compressed file, or binary data. No line number:
            # decompression reads ahead, so the failing line is not known.
            raise UserError(f"{path}: unreadable, truncated or not a JSON-lines file ({err})") from err


def read_jsonl(path: str) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def temporary_name(path: str) -> str:
    """Where ``path`` is written before it is renamed: same folder (rename stays atomic), one per process."""
    directory, base = os.path.split(os.path.abspath(str(path)))
    return os.path.join(directory, f".{base}.{os.getpid()}.partial")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Delete temporaries of ``path`` left by killed processes (their pid no longer runs)."""
    directory, base = os.path.split(os.path.abspath(str(path)))
    if not os.path.isdir(directory):
        return
    pattern = re.compile(rf"\.{re.escape(base)}\.(\d+)\.partial$")
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            stale = os.path.join(directory, name)
            if os.path.isdir(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.remove(stale)


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing an older one.

    The old folder is renamed away first and deleted last, so ``path`` holds
    either the old or the new complete folder at any moment (apart from the
    instant between the two renames).
    """
    old = temporary_name(path) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class AtomicJsonlWriter:
    """Write records to a temporary file; rename to ``path`` only on a clean close.

    Used as a context manager: an exception inside the block removes the
    temporary file, so a half-written output never appears under the final name.
    """

    def __init__(self, path: str):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.tmp_path = temporary_name(self.path)
        self._fh = None
        self.count = 0

    def __enter__(self):
        self._fh = xopen(self.tmp_path, "wt", format=_compression(self.path))
        return self

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            self._fh.close()
        except BaseException:
            os.remove(self.tmp_path)
            raise
        if exc_type is None:
            os.replace(self.tmp_path, self.path)
        else:
            os.remove(self.tmp_path)
        return False


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Atomically write all records; return how many were written."""
    with AtomicJsonlWriter(path) as writer:
        for record in records:
            writer.write(record)
    return writer.count


def write_text_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
