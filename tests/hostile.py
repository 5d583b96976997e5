"""Shared bits of the hostile-input tests (issue 17): tiny inputs and an in-process CLI runner."""

import os

import pytest

from pos2distill.errors import run_cli
from pos2distill.jsonl import write_jsonl

TOTAL = 4


def litm(i, n=TOTAL, answers=None):
    ctxs = [{"title": f"T{i}.{j}", "text": f"passage {j} of question {i}", "isgold": j == 0} for j in range(n)]
    return {"question": f"question {i}?", "answers": answers or [f"answer{i}"], "ctxs": ctxs}


def stage1_record(i, **changes):
    docs = [{"title": f"T{i}.{j}", "text": f"passage {j}"} for j in range(TOTAL)]
    record = {"example_id": i, "question": f"question {i}?", "answers": ["passage"], "gold_document": docs[0],
              "distractors": docs[1:], "documents": docs, "gold_idx": 0, "oracle_answer": "passage 0", "kind": "qa"}
    record.update(changes)
    return record


def jsonl(path, records) -> str:
    write_jsonl(str(path), records)
    return str(path)


def cli(main, argv, capsys) -> tuple[int, str]:
    """Run a script's ``main`` under ``run_cli`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        status = run_cli(main, [str(a) for a in argv]) or 0
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def assert_error(result, expected: str) -> str:
    """Exit status 2 and one line ``error: ...`` containing ``expected``."""
    status, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


def listing(folder) -> list[str]:
    """Every file and folder under ``folder`` (relative), to show that nothing was written."""
    out = []
    for root, dirs, files in os.walk(folder):
        out.extend(os.path.relpath(os.path.join(root, n), folder) for n in dirs + files)
    return sorted(out)


@pytest.fixture
def stage2_input(tmp_path):
    return jsonl(tmp_path / "nq" / "m_4docs_0.jsonl.gz", [stage1_record(i) for i in range(3)])


def stage2_args(source, out, *extra):
    return ["--input_path", source, "--model_name", "m", "--total_doc", TOTAL, "--example_num", 2,
            "--position_sample_num", 2, "--output_dir", out, *extra]
