"""Chunked, resumable writing of one output file.

A long stage writes its records in numbered chunks under ``<output>.partial/``
(created with the first chunk, next to a ``config.json`` of the arguments).
A restart with the same configuration skips the chunks already there; any
change of configuration starts over. The final file appears (atomically)
only when every chunk is done, so an interrupted run never leaves a
half-written output under the final name. The configuration of a finished
output is kept beside it in ``<output>.config.json``: a rerun with the same
configuration reuses the file instead of recomputing it. The stages hold the
output's lock (``output_guard.claim_output``) meanwhile, so the chunks of one run
are never deleted or mixed by another.
"""

import json
import os
import shutil

from .errors import UserError
from .jsonl import read_jsonl, remove_stale_temporaries, write_jsonl, write_text_atomic


def file_identity(path: str) -> dict:
    """Size and modification time of an input file: an edited input must not resume old chunks."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


class ChunkedOutput:
    def __init__(self, output_path: str, config: dict, log=print):
        self.output_path = str(output_path)
        self.partial_dir = self.output_path + ".partial"
        self.done_config_path = self.output_path + ".config.json"
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))
        self.log = log
        remove_stale_temporaries(self.output_path)
        # Complete already: the file and the configuration it was made with are both there.
        self.complete = os.path.isfile(self.output_path) and _read_json(self.done_config_path) == self.config
        if os.path.isdir(self.partial_dir):
            if self.complete:  # killed between writing the output and cleaning up
                shutil.rmtree(self.partial_dir)
            elif _read_json(self._config_path()) != self.config:
                if self.completed():
                    log(f"note: {self.partial_dir} was made with other arguments; starting over")
                shutil.rmtree(self.partial_dir)
            elif self.completed():
                log(f"resuming: {len(self.completed())} finished chunk(s) in {self.partial_dir}")

    def _config_path(self) -> str:
        return os.path.join(self.partial_dir, "config.json")

    def _write_config(self, path: str) -> None:
        write_text_atomic(path, json.dumps(self.config, indent=1, sort_keys=True))

    def _chunk_path(self, index: int) -> str:
        return os.path.join(self.partial_dir, f"chunk_{index:06d}.jsonl.gz")

    def done(self, index: int) -> bool:
        return self.complete or os.path.exists(self._chunk_path(index))

    def completed(self) -> list[int]:
        if not os.path.isdir(self.partial_dir):
            return []
        return sorted(
            int(name[6:12]) for name in os.listdir(self.partial_dir) if name.startswith("chunk_") and name.endswith(".jsonl.gz")
        )

    def _check_own_chunks(self) -> None:
        """The chunk folder must still hold this configuration's chunks (another run must not have
        swapped it; the stages' output lock makes that impossible, this makes it detected)."""
        recorded = _read_json(self._config_path())
        if recorded != self.config:
            raise UserError(f"{self.partial_dir} now holds chunks written under other arguments (another run on "
                            f"this output?); refusing to mix them with this run's")

    def write_chunk(self, index: int, records: list[dict]) -> None:
        # The folder appears with the first finished chunk: a run that fails before leaves nothing.
        if not os.path.isfile(self._config_path()):
            os.makedirs(self.partial_dir, exist_ok=True)
            self._write_config(self._config_path())
        self._check_own_chunks()
        write_jsonl(self._chunk_path(index), records)

    def read_chunk(self, index: int) -> list[dict]:
        return read_jsonl(self._chunk_path(index))

    def finalize(self, num_chunks: int) -> list[dict]:
        """Concatenate chunks 0..num_chunks-1 into the output; return all records."""
        if self.complete:
            return read_jsonl(self.output_path)
        missing = [i for i in range(num_chunks) if not self.done(i)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.output_path}: chunks {missing[:5]} missing")
        if num_chunks:
            self._check_own_chunks()
        records = [record for i in range(num_chunks) for record in self.read_chunk(i)]
        # The old marker goes first: it must never vouch for a file it did not describe.
        if os.path.exists(self.done_config_path):
            os.remove(self.done_config_path)
        write_jsonl(self.output_path, records)
        self._write_config(self.done_config_path)
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.complete = True
        return records
