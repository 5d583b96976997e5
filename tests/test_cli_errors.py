"""The catalogue of bad inputs, through the real command-line scripts.

Each case runs a stage script as a subprocess and checks the contract of
``pos2distill.errors.run_cli``: exit status 2, stderr exactly one line
``error: ...`` naming the file:line, field or flag, no traceback, and nothing
written under the output path. Most cases fail before any model is loaded, so
the whole file takes seconds. docs/reliability.md lists these cases with the
ones tested elsewhere (library tests, training tests).
"""

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from pos2distill.jsonl import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 4

STAGE1 = "gen_advantageous_pos_for_R1.py"
STAGE2 = "create_datasets.py"
STAGE3 = os.path.join("kd", "train_kd.py")
STAGE4 = "eval_data.py"


def litm(i, golds=(0,), n=TOTAL):
    ctxs = [{"title": f"T{i}.{j}", "text": f"passage {j} of question {i}", "isgold": j in golds} for j in range(n)]
    return {"question": f"question {i}?", "answers": [f"answer{i}"], "ctxs": ctxs}


def stage1_record(i, gold_idx=0):
    docs = [{"title": f"T{i}.{j}", "text": f"passage {j}"} for j in range(TOTAL)]
    return {"example_id": i, "question": f"question {i}?", "answers": ["passage"], "gold_document": docs[0],
            "distractors": docs[1:], "documents": docs, "gold_idx": gold_idx, "oracle_answer": "passage 0",
            "kind": "qa"}


def without(record, field):
    return {k: v for k, v in record.items() if k != field}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    """Input files, each with exactly one problem (on line 2 where the problem is a record)."""
    d = tmp_path_factory.mktemp("inputs")

    def jsonl(name, records):
        write_jsonl(str(d / name), records)
        return str(d / name)

    def text(name, content):
        (d / name).write_text(content)
        return str(d / name)

    good = jsonl("nq-good.jsonl", [litm(i) for i in range(3)])
    raw = {"question": "q?", "answers": ["x"], "gold_document": {"title": "g", "text": "a"},
           "distractors": [{"title": "d", "text": "x"}] * (TOTAL - 1)}
    truncated = d / "nq-truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress((json.dumps(litm(0)) + "\n").encode() * 50)[:-40])

    nochat = d / "nochat-model"
    shutil.copytree(tiny_model, nochat)
    # transformers 5 keeps the template in chat_template.jinja; older folders in tokenizer_config.json
    (nochat / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((nochat / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (nochat / "tokenizer_config.json").write_text(json.dumps(config))

    return {
        "dir": d,
        "model": tiny_model,
        "nochat": str(nochat),
        "good": good,
        "empty": text("nq-empty.jsonl", "\n"),
        "bad_summary": text("summary.json", '{"label": "x"}'),
        "badjson": text("nq-badjson.jsonl", json.dumps(litm(0)) + "\n{\"question\": oops}\n"),
        "truncated": str(truncated),
        "no_question": jsonl("nq-noq.jsonl", [litm(0), without(litm(1), "question")]),
        "no_answers": jsonl("nq-noa.jsonl", [litm(0), without(litm(1), "answers")]),
        "no_gold_field": jsonl("nq-raw.jsonl", [raw, without(raw, "gold_document")]),
        "no_gold": jsonl("nq-nogold.jsonl", [litm(0), litm(1, golds=())]),
        "two_golds": jsonl("nq-twogold.jsonl", [litm(0), litm(1, golds=(0, 2))]),
        "few_docs": jsonl("nq-fewdocs.jsonl", [litm(0), litm(1, n=TOTAL - 2)]),
        "s1_badjson": text("s1-badjson.jsonl", json.dumps(stage1_record(0)) + "\nnot json\n"),
        "s1_gold_range": jsonl("s1-gold.jsonl", [stage1_record(0), stage1_record(1, gold_idx=7)]),
        "s1_no_answer": jsonl("s1-noanswer.jsonl", [stage1_record(0), without(stage1_record(1), "oracle_answer")]),
        "s1_none_correct": jsonl("s1-wrong.jsonl", [dict(stage1_record(i), oracle_answer="no idea") for i in range(3)]),
    }


def run(script, args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=full_env)


def assert_one_line_error(proc, expected: str, output: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    # Errors found after the weights are loaded follow transformers' progress bar.
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    # Nothing under the output path: no file, no temporary, no empty chunk folder.
    assert not os.path.exists(output), sorted(os.listdir(output))


def generation_args(files, out, data="good", *extra, model=None):
    """Flags of stages 1 and 4 (they share the input and model flags)."""
    path = files[data] if data in files else data
    models = model if isinstance(model, list) else [model or files["model"]]
    return ["--input-path", path, "--model", *models, "--backend", "hf",
            "--total_doc", TOTAL, "--max-new-tokens", 4, "--output-path", out, *extra]


s1 = s4 = generation_args


def s2(files, out, input_key):
    return ["--input_path", files[input_key], "--total_doc", TOTAL, "--output_dir", out,
            "--position_sample_num", 2, "--example_num", 2]


# (case id, script, args builder, expected text in the error line, extra environment)
CASES = [
    # stage 1: input records
    ("s1-malformed-json", STAGE1, lambda f, o: s1(f, o, "badjson"), "nq-badjson.jsonl:2: malformed JSON", None),
    ("s1-truncated-gzip", STAGE1, lambda f, o: s1(f, o, "truncated"), "nq-truncated.jsonl.gz: unreadable, truncated", None),
    ("s1-missing-file", STAGE1, lambda f, o: s1(f, o, f["good"] + ".nope"),
     "nq-good.jsonl.nope: no such file", None),
    ("s1-empty-input", STAGE1, lambda f, o: s1(f, o, "empty"), "nq-empty.jsonl: no examples", None),
    ("s1-missing-question", STAGE1, lambda f, o: s1(f, o, "no_question"), "nq-noq.jsonl:2: missing field 'question'", None),
    ("s1-missing-answers", STAGE1, lambda f, o: s1(f, o, "no_answers"), "nq-noa.jsonl:2: missing field 'answers'", None),
    ("s1-missing-gold-field", STAGE1, lambda f, o: s1(f, o, "no_gold_field"),
     "nq-raw.jsonl:2: missing field 'gold_document'", None),
    ("s1-no-gold", STAGE1, lambda f, o: s1(f, o, "no_gold"),
     "nq-nogold.jsonl:2: expected exactly one ctx with 'isgold': true, found none", None),
    ("s1-two-golds", STAGE1, lambda f, o: s1(f, o, "two_golds"),
     "nq-twogold.jsonl:2: expected exactly one ctx with 'isgold': true, found 2", None),
    ("s1-fewer-docs", STAGE1, lambda f, o: s1(f, o, "few_docs"),
     f"nq-fewdocs.jsonl:2: has {TOTAL - 2} documents (gold + {TOTAL - 3} distractors) but --total_doc {TOTAL}", None),
    # stage 1: flags
    ("s1-gold-doc-range", STAGE1, lambda f, o: s1(f, o, "good", "--gold_doc", TOTAL),
     f"--gold_doc {TOTAL} out of range 0..{TOTAL - 1} for --total_doc {TOTAL}", None),
    ("s1-gold-doc-word", STAGE1, lambda f, o: s1(f, o, "good", "--gold_doc", "middle"), "--gold_doc: a position", None),
    ("s1-probe-positions-range", STAGE1, lambda f, o: s1(f, o, "good", "--gold_doc", "auto", "--probe_positions", "0,9"),
     f"--probe_positions 9 out of range 0..{TOTAL - 1}", None),
    ("s1-chunk-size", STAGE1, lambda f, o: s1(f, o, "good", "--chunk_size", 0), "--chunk_size must be at least 1", None),
    ("s1-unknown-backend", STAGE1, lambda f, o: s1(f, o) + ["--backend", "tensorrt"],
     "unknown backend 'tensorrt' (--backend)", None),
    ("s1-vllm-missing", STAGE1, lambda f, o: s1(f, o) + ["--backend", "vllm"],
     "vLLM requested (--backend vllm) but not installed", None),
    ("s1-model-missing", STAGE1, lambda f, o: s1(f, o, model=str(f["dir"] / "no-such-model")),
     "no-such-model: model path does not exist", None),
    ("s1-model-not-on-hub", STAGE1, lambda f, o: s1(f, o, model="no-such-org/no-such-model"),
     "no-such-org/no-such-model: not a local folder, and loading it from the Hugging Face Hub failed",
     {"HF_HUB_OFFLINE": "1"}),
    ("s1-no-chat-template", STAGE1, lambda f, o: s1(f, o, model=f["nochat"]),
     "nochat-model: the tokenizer has no chat template", None),
    ("s1-tf32-needs-float32", STAGE1, lambda f, o: s1(f, o) + ["--backend", "hf", "--tf32"],
     "--tf32 changes float32 matrix multiplies only; pass --dtype float32 (got auto)", None),
    ("s1-unknown-dtype", STAGE1, lambda f, o: s1(f, o) + ["--dtype", "fp8"], "unknown dtype 'fp8'", None),
    ("s1-prompt-too-long", STAGE1, lambda f, o: s1(f, o, "good", "--max-prompt-length", 20),
     "chunk 0: 3 of 3 prompts exceed --max-prompt-length 20", None),
    # stage 2
    ("s2-no-stage1-file", STAGE2, lambda f, o: ["--raw_data_dir", f["dir"], "--model_name", "m", "--output_dir", o],
     "need exactly one stage-1 file matching", None),
    ("s2-malformed-json", STAGE2, lambda f, o: s2(f, o, "s1_badjson"), "s1-badjson.jsonl:2: malformed JSON", None),
    ("s2-missing-field", STAGE2, lambda f, o: s2(f, o, "s1_no_answer"),
     "s1-noanswer.jsonl:2: missing field 'oracle_answer'", None),
    ("s2-gold-idx-range", STAGE2, lambda f, o: s2(f, o, "s1_gold_range"),
     f"s1-gold.jsonl:2: 'gold_idx' 7 out of range 0..{TOTAL - 1} for --total_doc {TOTAL}", None),
    ("s2-none-pass", STAGE2, lambda f, o: s2(f, o, "s1_none_correct"), "none of the 3 examples pass the filter", None),
    # stage 4
    ("s4-malformed-json", STAGE4, lambda f, o: s4(f, o, "badjson"), "nq-badjson.jsonl:2: malformed JSON", None),
    ("s4-fewer-docs", STAGE4, lambda f, o: s4(f, o, "few_docs"), "nq-fewdocs.jsonl:2: has 2 documents", None),
    ("s4-positions-range", STAGE4, lambda f, o: s4(f, o, "good", "--positions", "0,9"),
     f"--positions 9 out of range 0..{TOTAL - 1} for --total_doc {TOTAL}", None),
    ("s4-tf32-needs-float32", STAGE4, lambda f, o: s4(f, o, "good", "--backend", "hf", "--dtype", "bfloat16", "--tf32"),
     "--tf32 changes float32 matrix multiplies only; pass --dtype float32 (got bfloat16)", None),
    ("s4-label-count", STAGE4, lambda f, o: s4(f, o, "good", "--label", "a", "b"), "--label gives 2 labels for 1 models", None),
    ("s4-second-model-missing", STAGE4, lambda f, o: s4(f, o, model=[f["model"], str(f["dir"] / "typo")]),
     "typo: model path does not exist", None),
    ("s4-train-dataset-missing", STAGE4, lambda f, o: s4(f, o, "good", "--train_dataset", str(f["dir"] / "nope")),
     "nope: no such file or folder", None),
    ("plot-bad-summary", "plot_positions.py", lambda f, o: [f["bad_summary"], "--output", os.path.join(o, "p.png")],
     "summary.json: not a summary JSON written by eval_data.py", None),
    ("s4-no-chat-template", STAGE4, lambda f, o: s4(f, o, model=f["nochat"]),
     "nochat-model: the tokenizer has no chat template", None),
    ("s4-hf-tensor-parallel", STAGE4, lambda f, o: s4(f, o, "good", "--tensor_parallel_size", 2),
     "the hf backend has no tensor parallelism", None),
    ("s4-hf-too-few-gpus", STAGE4, lambda f, o: s4(f, o, "good", "--num_gpus", 2),
     "--num_gpus 2 but only 0 GPU(s) visible", {"CUDA_VISIBLE_DEVICES": ""}),
    ("s1-tensor-parallel-zero", STAGE1, lambda f, o: s1(f, o, "good", "--tensor_parallel_size", 0),
     "--tensor_parallel_size must be at least 1", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error_without_output(case, files, tmp_path):
    name, script, build, expected, env = case
    if name == "s1-vllm-missing" and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    out = str(tmp_path / "out")
    assert_one_line_error(run(script, build(files, out), env), expected, out)


def test_training_set_empty_after_max_len_filter(files, tmp_path):
    from test_train_kd_e2e import make_pair_dataset

    make_pair_dataset(tmp_path / "data" / "nqtiny")
    save = str(tmp_path / "save")
    proc = run(STAGE3, ["--dataset", "nqtiny", "--data_root", tmp_path / "data", "--pretrain", files["model"],
                        "--apply_chat_template", "--max_len", 40, "--save_path", save])
    assert_one_line_error(proc, f"{tmp_path / 'data' / 'nqtiny'}: no rows left after --max_len 40 filtering", save)


def test_training_set_smaller_than_a_batch(files, tmp_path):
    from test_train_kd_e2e import make_pair_dataset

    make_pair_dataset(tmp_path / "data" / "nqtiny")  # 12 rows
    save = str(tmp_path / "save")
    proc = run(STAGE3, ["--dataset", "nqtiny", "--data_root", tmp_path / "data", "--pretrain", files["model"],
                        "--train_batch_size", 32, "--save_path", save])
    assert_one_line_error(proc, "12 usable rows (0 dropped by --max_len 32000) are fewer than --train_batch_size 32", save)


def test_training_model_missing(files, tmp_path):
    from test_train_kd_e2e import make_pair_dataset

    make_pair_dataset(tmp_path / "data" / "nqtiny", n_examples=1, copies=1)
    save = str(tmp_path / "save")
    proc = run(STAGE3, ["--dataset", "nqtiny", "--data_root", tmp_path / "data", "--pretrain", tmp_path / "nope",
                        "--save_path", save])
    assert_one_line_error(proc, "nope: model path does not exist", save)


def test_training_refuses_packing_for_a_model_with_convolution_layers(files, tmp_path, tiny_model):
    import json
    import shutil

    from test_train_kd_e2e import make_pair_dataset

    make_pair_dataset(tmp_path / "data" / "nqtiny", n_examples=1, copies=1)
    model = tmp_path / "conv-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["layer_types"] = ["conv", "full_attention"]  # as LFM2's short convolutions
    (model / "config.json").write_text(json.dumps(config))
    save = str(tmp_path / "save")
    proc = run(STAGE3, ["--dataset", "nqtiny", "--data_root", tmp_path / "data", "--pretrain", model,
                        "--train_batch_size", "2", "--micro_train_batch_size", "1", "--packing_samples",
                        "--save_path", save])
    assert_one_line_error(proc, "packed rows: the model has conv layers, which would mix tokens across rows", save)


def test_debug_shows_the_traceback(files, tmp_path):
    proc = run(STAGE1, s1(files, str(tmp_path / "out"), "badjson", "--debug"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr
    assert "nq-badjson.jsonl:2: malformed JSON" in proc.stderr
