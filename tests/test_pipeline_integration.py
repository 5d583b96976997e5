"""Stages 1 -> 2 -> 4 on CPU with a tiny random model, through the real CLIs."""

import json
import os
import subprocess
import sys

from pos2distill.jsonl import read_jsonl, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 4


def litm_record(i):
    # A random model's text nearly always contains the letter "e": such questions
    # pass stage 2's filter, the "zqxj" ones never do, so the filter is exercised.
    answer = "e" if i % 2 == 0 else "zqxj"
    ctxs = [{"title": f"Gold {i}", "text": f"The answer to question {i} is {answer}.", "hasanswer": True, "isgold": True}]
    ctxs += [{"title": f"Other {i}.{j}", "text": f"Unrelated passage {j}.", "hasanswer": False, "isgold": False}
             for j in range(TOTAL - 1)]
    return {"question": f"what is the answer to question {i}", "answers": [answer], "ctxs": ctxs}


def run(script, *args, env=None):
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_stages_1_2_4(tmp_path, tiny_model):
    data = tmp_path / "nq-test.jsonl.gz"
    write_jsonl(str(data), [litm_record(i) for i in range(16)])

    out = run("gen_advantageous_pos_for_R1.py", "--input-path", data, "--model", tiny_model,
              "--output-path", tmp_path / "raw_data", "--dataset_name", "nq", "--total_doc", TOTAL,
              "--gold_doc", "auto", "--probe_num", 4, "--eval_holdout", 6, "--max-new-tokens", 12,
              "--backend", "hf", "--limit", 10, "--chunk_size", 4)
    assert "advantageous position:" in out
    name = os.path.basename(tiny_model)
    stage1 = [f for f in os.listdir(tmp_path / "raw_data" / "nq") if f.endswith(".jsonl.gz")]
    assert len(stage1) == 1 and stage1[0].startswith(f"{name}_{TOTAL}docs_")
    records = read_jsonl(str(tmp_path / "raw_data" / "nq" / stage1[0]))
    assert len(records) == 10
    position = records[0]["gold_idx"]
    # the probe's curve, tests and choice are kept beside the answers
    with open(tmp_path / "raw_data" / "nq" / stage1[0].replace(".jsonl.gz", ".summary.json")) as fh:
        choice = json.load(fh)["probe"]["choice"]
    assert choice["chosen"] == position and [r["position"] for r in choice["rows"]] == list(range(TOTAL))
    assert all(r["n"] == 4 for r in choice["rows"]) and choice["reason"] in out
    for r in records:
        assert r["documents"][r["gold_idx"]] == r["gold_document"]
        assert len(r["documents"]) == TOTAL and r["oracle_prompt"].startswith("<|im_start|>")
    correct = sum(r["oracle_correct"] for r in records)
    assert 0 < correct < 10

    run("create_datasets.py", "--model_name", name, "--dataset_name", "nq", "--total_doc", TOTAL,
        "--raw_data_dir", tmp_path / "raw_data", "--output_dir", tmp_path / "data",
        "--position_sample_num", 2, "--strengthen", 1, "--example_num", correct)
    from datasets import load_from_disk

    dataset_dir = tmp_path / "data" / f"{name}_{TOTAL}total_docs_filter_2random_1strengthen_{correct}"
    rows = load_from_disk(str(dataset_dir))
    assert len(rows) == 3 * correct
    assert all(r["teacher_gold_idx"] == position for r in rows)

    out = run("eval_data.py", "--input-path", data, "--model", tiny_model, tiny_model, "--label", "base", "again",
              "--dataset_name", "nq", "--output-path", tmp_path / "evaluate", "--total_doc", TOTAL,
              "--sample_num", 6, "--max-new-tokens", 12, "--backend", "hf", "--train_dataset", dataset_dir)
    assert "no overlap" in out
    predictions = read_jsonl(str(tmp_path / "evaluate" / "nq" / "base" / f"predictions_{TOTAL}docs.jsonl.gz"))
    assert len(predictions) == 6 * TOTAL
    assert sorted({p["gold_idx"] for p in predictions}) == list(range(TOTAL))
    assert {p["example_id"] for p in predictions} == set(range(10, 16))
    with open(tmp_path / "evaluate" / "nq" / f"positions_{TOTAL}docs_base_vs_again.json") as fh:
        summaries = json.load(fh)
    assert [s["label"] for s in summaries] == ["base", "again"]
    # greedy decoding of the same model twice gives the same curve
    assert summaries[0]["accuracy"] == summaries[1]["accuracy"]
    assert os.path.getsize(tmp_path / "evaluate" / "nq" / f"positions_{TOTAL}docs_base_vs_again.png") > 1000

    # several positions per generate call, finished rows compacted: the same greedy answers (fp32 on CPU)
    run("eval_data.py", "--input-path", data, "--model", tiny_model, "--label", "grouped", "--dataset_name", "nq",
        "--output-path", tmp_path / "evaluate", "--total_doc", TOTAL, "--sample_num", 6, "--max-new-tokens", 12,
        "--backend", "hf", "--positions_per_call", 3, "--compact_finished", "--batch_size", 8)
    grouped = read_jsonl(str(tmp_path / "evaluate" / "nq" / "grouped" / f"predictions_{TOTAL}docs.jsonl.gz"))
    assert grouped == predictions

    # two data-parallel workers (--num_gpus 2; on this CPU-only machine both run on the CPU)
    two_gpus = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
    run("eval_data.py", "--input-path", data, "--model", tiny_model, "--label", "parallel", "--dataset_name", "nq",
        "--output-path", tmp_path / "evaluate", "--total_doc", TOTAL, "--sample_num", 6, "--max-new-tokens", 12,
        "--backend", "hf", "--num_gpus", 2, "--positions_per_call", 2, env=two_gpus)
    parallel_path = tmp_path / "evaluate" / "nq" / "parallel" / f"predictions_{TOTAL}docs.jsonl.gz"
    assert read_jsonl(str(parallel_path)) == predictions
    with open(f"{parallel_path}.config.json") as fh:
        assert json.load(fh)["hf_workers"] == 2
    assert "avg" in out and "gap" in out
