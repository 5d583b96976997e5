"""Reading and atomically writing (optionally compressed) JSON-lines files."""

import json
import os
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
    with xopen(path, "rt") as fh:
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


def read_jsonl(path: str) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


class AtomicJsonlWriter:
    """Write records to a temporary file; rename to ``path`` only on a clean close.

    Used as a context manager: an exception inside the block removes the
    temporary file, so a half-written output never appears under the final name.
    """

    def __init__(self, path: str):
        self.path = str(path)
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        self.tmp_path = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.partial")
        self._fh = None
        self.count = 0

    def __enter__(self):
        self._fh = xopen(self.tmp_path, "wt", format=_compression(self.path))
        return self

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb):
        self._fh.close()
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
    directory = os.path.dirname(str(path)) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(str(path))}.{os.getpid()}.partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
