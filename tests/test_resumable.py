import os

from pos2distill.jsonl import read_jsonl
from pos2distill.resumable import ChunkedOutput


def test_chunks_resume_and_finalize(tmp_path):
    path = str(tmp_path / "out.jsonl.gz")
    job = ChunkedOutput(path, {"a": 1})
    job.write_chunk(0, [{"i": 0}])
    assert not os.path.exists(path)  # nothing under the final name until complete
    again = ChunkedOutput(path, {"a": 1})
    assert again.done(0) and not again.done(1)
    again.write_chunk(1, [{"i": 1}, {"i": 2}])
    assert again.finalize(2) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert not os.path.exists(path + ".partial")


def test_other_arguments_start_over(tmp_path):
    path = str(tmp_path / "out.jsonl.gz")
    ChunkedOutput(path, {"seed": 1}).write_chunk(0, [{"i": 0}])
    assert not ChunkedOutput(path, {"seed": 2}).done(0)
