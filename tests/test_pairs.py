import hashlib
import json
import os
import subprocess
import sys

import pytest

from pos2distill.errors import UserError
from pos2distill.jsonl import write_jsonl
from pos2distill.names import dataset_name
from pos2distill.pairs import build_rows, position_counts, select_correct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6
ADVANTAGEOUS = 0


def stage1_record(i, correct=True):
    gold = {"title": f"gold {i}", "text": f"the answer is answer{i}"}
    distractors = [{"title": f"d{i}-{j}", "text": f"nothing {j}"} for j in range(TOTAL - 1)]
    return {
        "example_id": i,
        "question": f"question {i}?",
        "answers": [f"answer{i}"],
        "gold_document": gold,
        "distractors": distractors,
        "documents": [gold] + distractors,
        "gold_idx": ADVANTAGEOUS,
        "instruction": "inst",
        "oracle_answer": f"answer{i}\nmore" if correct else "no idea",
        "kind": "qa",
    }


def records(n, wrong=()):
    return [(f"f:{i + 1}", stage1_record(i, correct=i not in wrong)) for i in range(n)]


def test_filter_keeps_first_correct_in_order():
    kept = select_correct(records(10, wrong={1, 3}), 4, TOTAL)
    assert [r["example_id"] for _, r in kept] == [0, 2, 4, 5]


def test_unfiltered_control_keeps_first_whatever_the_answer():
    kept = select_correct(records(10, wrong={1, 3}), 4, TOTAL, require_correct=False)
    assert [r["example_id"] for _, r in kept] == [0, 1, 2, 3]
    assert dataset_name("m", 20, 4, 1, 400, filtered=False) == "m_20total_docs_nofilter_4random_1strengthen_400"
    with pytest.raises(UserError, match="only 10 of 10 examples are in the stage-1 file"):
        select_correct(records(10), 11, TOTAL, require_correct=False)


def test_filter_error_says_how_many_passed():
    with pytest.raises(UserError, match="only 8 of 10 examples pass"):
        select_correct(records(10, wrong={1, 3}), 9, TOTAL)


def test_pair_invariants():
    k, strengthen = 3, 1
    kept = select_correct(records(8), 8, TOTAL)
    rows = build_rows(kept, TOTAL, k, strengthen, seed=7)
    assert len(rows) == 8 * (k + strengthen)
    for example_id in range(8):
        mine = [r for r in rows if r["example_id"] == example_id]
        trivial = [r["gold_idx"] for r in mine if not r["is_anchor"]]
        anchors = [r for r in mine if r["is_anchor"]]
        assert len(trivial) == k and len(set(trivial)) == k and ADVANTAGEOUS not in trivial
        assert len(anchors) == strengthen and all(a["gold_idx"] == ADVANTAGEOUS for a in anchors)
        for row in mine:
            assert row["documents"][row["gold_idx"]]["title"] == f"gold {example_id}"
            assert sorted(d["title"] for d in row["documents"]) == sorted(d["title"] for d in row["teacher_documents"])
            assert row["teacher_documents"][row["teacher_gold_idx"]]["title"] == f"gold {example_id}"
    counts = position_counts(rows, TOTAL)
    assert sum(counts.values()) == len(rows) and counts[ADVANTAGEOUS] == 8


def test_distractors_are_reshuffled_per_copy():
    rows = build_rows(select_correct(records(20), 20, TOTAL), TOTAL, 4, 1, seed=0)
    orders = {tuple(d["title"] for d in r["documents"] if not d["title"].startswith("gold")) for r in rows}
    assert len(orders) > len(rows) // 2


def test_deterministic_with_a_seed():
    kept = select_correct(records(5), 5, TOTAL)
    assert build_rows(kept, TOTAL, 2, 1, seed=3) == build_rows(kept, TOTAL, 2, 1, seed=3)
    assert build_rows(kept, TOTAL, 2, 1, seed=3) != build_rows(kept, TOTAL, 2, 1, seed=4)


def test_too_many_trivial_positions():
    with pytest.raises(UserError, match="--position_sample_num"):
        build_rows(select_correct(records(2), 2, TOTAL), TOTAL, TOTAL, 1, seed=0)


def test_reference_dataset_name():
    assert dataset_name("Mistral-7B-Instruct-v0.3", 20, 4, 1, 400) == (
        "Mistral-7B-Instruct-v0.3_20total_docs_filter_4random_1strengthen_400"
    )


def _tree_digest(path):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as fh:
            digest.update(name.encode() + fh.read())
    return digest.hexdigest()


def test_create_datasets_cli_is_byte_identical_across_runs(tmp_path):
    raw = tmp_path / "raw_data" / "nq"
    write_jsonl(str(raw / f"m_{TOTAL}docs_0.jsonl.gz"), [r for _, r in records(6, wrong={2})])
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [sys.executable, os.path.join(ROOT, "create_datasets.py"), "--model_name", "m", "--total_doc", str(TOTAL),
               "--raw_data_dir", str(tmp_path / "raw_data"), "--output_dir", str(out),
               "--position_sample_num", "2", "--example_num", "5"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        name = dataset_name("m", TOTAL, 2, 1, 5)
        assert os.path.exists(out / f"{name}.position_counts.json")
        digests.append(_tree_digest(out / name))
    assert digests[0] == digests[1]

    from datasets import load_from_disk

    dataset = load_from_disk(str(tmp_path / "a" / dataset_name("m", TOTAL, 2, 1, 5)))
    assert len(dataset) == 15 and set(dataset.column_names) >= {"question", "documents", "gold_idx", "is_anchor"}

    # --no_filter: the first 5 examples, the wrong one (#2) among them, under a "nofilter" name
    done = subprocess.run(cmd + ["--no_filter"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "kept 5 examples, 4 with a correct answer" in done.stdout
    name = dataset_name("m", TOTAL, 2, 1, 5, filtered=False)
    stats = json.loads((out / f"{name}.position_counts.json").read_text())
    assert stats["filtered"] is False and stats["kept_correct"] == 4
    assert sorted(set(load_from_disk(str(out / name))["example_id"])) == [0, 1, 2, 3, 4]


def test_create_datasets_cli_error_is_one_line(tmp_path):
    raw = tmp_path / "raw_data" / "nq"
    write_jsonl(str(raw / f"m_{TOTAL}docs_0.jsonl.gz"), [r for _, r in records(3, wrong={0})])
    cmd = [sys.executable, os.path.join(ROOT, "create_datasets.py"), "--model_name", "m", "--total_doc", str(TOTAL),
           "--raw_data_dir", str(tmp_path / "raw_data"), "--output_dir", str(tmp_path / "out"), "--example_num", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: only 2 of 3 examples pass the filter (correct oracle answer); lower --example_num (asked for 5)"
    assert not os.path.exists(tmp_path / "out" / dataset_name("m", TOTAL, 4, 1, 5))


def test_table3_datasets_without_anchors_and_seeds_get_their_own_names(tmp_path):
    # "KL without anchors" and "+align" train on --strengthen 0; another --seed must not overwrite seed 42's
    raw = tmp_path / "raw_data" / "nq"
    write_jsonl(str(raw / f"m_{TOTAL}docs_0.jsonl.gz"), [r for _, r in records(6)])
    from datasets import load_from_disk

    base = [sys.executable, os.path.join(ROOT, "create_datasets.py"), "--model_name", "m", "--total_doc", str(TOTAL),
            "--raw_data_dir", str(tmp_path / "raw_data"), "--output_dir", str(tmp_path / "out"),
            "--position_sample_num", "2", "--example_num", "5", "--strengthen", "0"]
    positions = {}
    for seed in ("42", "7"):
        done = subprocess.run(base + ["--seed", seed], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        name = dataset_name("m", TOTAL, 2, 0, 5, seed=int(seed))
        assert name.endswith("" if seed == "42" else "_seed7")
        dataset = load_from_disk(str(tmp_path / "out" / name))
        assert len(dataset) == 10 and not any(dataset["is_anchor"])
        positions[seed] = dataset["gold_idx"]
    assert positions["42"] != positions["7"]  # the seed samples other trivial positions


def test_training_and_stage1_names_carry_a_non_default_seed():
    from gen_advantageous_pos_for_R1 import output_file, parse_args as stage1_args
    from kd.train_kd import parse_args

    flags = ["--dataset", "data/d", "--pretrain", "m", "--kd_coef", "1,0,0,0"]
    assert parse_args(flags).run_name == "d_kd1.0_lm0.0_rank0.0_adaptive0.0_1.0"
    assert parse_args(flags + ["--seed", "3"]).run_name == "d_kd1.0_lm0.0_rank0.0_adaptive0.0_1.0_seed3"
    args = stage1_args(["--input-path", "x.jsonl", "--seed", "3"])
    assert output_file(args, "nq", "m", 0) == os.path.join("raw_data", "nq", "m_20docs_0_seed3.jsonl.gz")
    assert output_file(stage1_args(["--input-path", "x.jsonl"]), "nq", "m", 0).endswith("m_20docs_0.jsonl.gz")
