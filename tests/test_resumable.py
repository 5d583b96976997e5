import os

from pos2distill.jsonl import AtomicJsonlWriter, read_jsonl
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


def test_nothing_on_disk_before_the_first_chunk(tmp_path):
    path = str(tmp_path / "out.jsonl.gz")
    job = ChunkedOutput(path, {"a": 1})
    assert not job.done(0) and os.listdir(tmp_path) == []  # a run that fails now leaves nothing
    job.write_chunk(0, [{"i": 0}])
    assert sorted(os.listdir(path + ".partial")) == ["chunk_000000.jsonl.gz", "config.json"]


def test_finished_output_is_reused_only_with_the_same_config(tmp_path):
    path = str(tmp_path / "out.jsonl.gz")
    job = ChunkedOutput(path, {"a": 1})
    job.write_chunk(0, [{"i": 0}])
    job.finalize(1)
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl.gz", "out.jsonl.gz.config.json"]
    again = ChunkedOutput(path, {"a": 1})
    assert again.complete and again.done(0) and again.finalize(1) == [{"i": 0}]
    other = ChunkedOutput(path, {"a": 2})
    assert not other.complete and not other.done(0)
    other.write_chunk(0, [{"i": 5}])
    assert other.finalize(1) == [{"i": 5}] and read_jsonl(path) == [{"i": 5}]
    assert ChunkedOutput(path, {"a": 2}).complete and not ChunkedOutput(path, {"a": 1}).complete


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    path = tmp_path / "out.jsonl.gz"
    dead = tmp_path / ".out.jsonl.gz.99999999.partial"  # above any pid_max: no such process
    alive = tmp_path / f".out.jsonl.gz.{os.getppid()}.partial"
    dead.write_text("half")
    alive.write_text("being written")
    ChunkedOutput(str(path), {"a": 1})
    assert not dead.exists() and alive.exists()


def test_writers_leave_no_temporary_on_error(tmp_path):
    path = tmp_path / "out.jsonl"
    try:
        with AtomicJsonlWriter(str(path)) as writer:
            writer.write({"i": 0})
            raise RuntimeError("disk full")
    except RuntimeError:
        pass
    assert os.listdir(tmp_path) == []
