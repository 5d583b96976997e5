"""Chunked, resumable writing of one output file.

A long stage writes its records in numbered chunks under ``<output>.partial/``.
A restart with the same configuration skips the chunks already there; any
change of configuration starts over. The final file appears (atomically)
only when every chunk is done, so an interrupted run never leaves a
half-written output under the final name.
"""

import json
import os
import shutil

from .jsonl import read_jsonl, write_jsonl, write_text_atomic


class ChunkedOutput:
    def __init__(self, output_path: str, config: dict):
        self.output_path = str(output_path)
        self.partial_dir = self.output_path + ".partial"
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))
        self._prepare()

    def _config_path(self) -> str:
        return os.path.join(self.partial_dir, "config.json")

    def _prepare(self) -> None:
        if os.path.isdir(self.partial_dir):
            try:
                with open(self._config_path(), encoding="utf-8") as fh:
                    same = json.load(fh) == self.config
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                print(f"note: {self.partial_dir} was made with other arguments; starting over")
                shutil.rmtree(self.partial_dir)
        os.makedirs(self.partial_dir, exist_ok=True)
        write_text_atomic(self._config_path(), json.dumps(self.config, indent=1, sort_keys=True))

    def _chunk_path(self, index: int) -> str:
        return os.path.join(self.partial_dir, f"chunk_{index:06d}.jsonl.gz")

    def done(self, index: int) -> bool:
        return os.path.exists(self._chunk_path(index))

    def completed(self) -> list[int]:
        return sorted(
            int(name[6:12]) for name in os.listdir(self.partial_dir) if name.startswith("chunk_") and name.endswith(".jsonl.gz")
        )

    def write_chunk(self, index: int, records: list[dict]) -> None:
        write_jsonl(self._chunk_path(index), records)

    def read_chunk(self, index: int) -> list[dict]:
        return read_jsonl(self._chunk_path(index))

    def finalize(self, num_chunks: int) -> list[dict]:
        """Concatenate chunks 0..num_chunks-1 into the output; return all records."""
        missing = [i for i in range(num_chunks) if not self.done(i)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.output_path}: chunks {missing[:5]} missing")
        records = [record for i in range(num_chunks) for record in self.read_chunk(i)]
        write_jsonl(self.output_path, records)
        shutil.rmtree(self.partial_dir)
        return records
