"""pos2distill.names: the stage file/dataset/checkpoint names, their shell interface, and the
plain-name check on every flag that names an output (issue 17 class 5)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from pos2distill.errors import UserError, run_cli
from pos2distill.jsonl import write_jsonl
from pos2distill.names import (check_name, checkpoint_name, dataset_name, model_name, parse_kd_coef, stage1_file,
                               stage1_summary)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_NAMES = ["../escape", "/tmp/abs", "a/b", "..", ".", "", "  ", "x" * 101, "tab\tname", "back\\slash"]


@pytest.mark.parametrize("value", BAD_NAMES)
def test_check_name_refuses_what_is_not_a_plain_name(value):
    with pytest.raises(UserError, match="^--label"):
        check_name(value, "--label")


@pytest.mark.parametrize("value", ["nq", "p2d-s42", "Qwen2.5-7B-Instruct", "a.b_c", "x" * 100])
def test_check_name_accepts_plain_names(value):
    assert check_name(value, "--label") == value


def test_names_of_one_pipeline():
    model = model_name("/models/Qwen2.5-0.5B-Instruct.Q8_0.gguf")
    assert model == "Qwen2.5-0.5B-Instruct"
    assert stage1_file("raw", "nq", model, 20, 0) == os.path.join("raw", "nq", "Qwen2.5-0.5B-Instruct_20docs_0.jsonl.gz")
    assert stage1_summary("raw/nq/m_20docs_0.jsonl.gz") == "raw/nq/m_20docs_0.summary.json"
    data = dataset_name(model, 20, 4, 1, 400)
    assert data == "Qwen2.5-0.5B-Instruct_20total_docs_filter_4random_1strengthen_400"
    assert checkpoint_name(f"data/{data}/", parse_kd_coef("0,0,0,1"), 1) == data + "_kd0.0_lm0.0_rank0.0_adaptive1.0_1.0"


def names_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pos2distill.names", *args], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT))


def test_names_cli_prints_what_the_library_builds():
    assert names_cli("model", "--model", "dir/x.Q8_0.gguf").stdout == "x\n"
    out = names_cli("dataset", "--model_name", "x", "--total_doc", "3", "--position_sample_num", "2",
                    "--strengthen", "0", "--example_num", "5", "--no_filter").stdout
    assert out == dataset_name("x", 3, 2, 0, 5, filtered=False) + "\n"
    out = names_cli("checkpoint", "--dataset", "d", "--kd_coef", "1,0,0,0", "--perserve", "0.5").stdout
    assert out == "d_kd1.0_lm0.0_rank0.0_adaptive0.0_0.5\n"
    proc = names_cli("check", "--flag", "DATASET_NAME", "../x")
    assert proc.returncode == 2 and proc.stderr.startswith("error: DATASET_NAME '../x': must be a plain name")


def fake_deepspeed(tmp_path):
    """A deepspeed launcher that only prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    launcher = bin_dir / "deepspeed"
    launcher.write_text('#!/bin/sh\necho "deepspeed $*"\n')
    launcher.chmod(0o755)
    return os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def train_nq(tmp_path, **env):
    return subprocess.run(["bash", os.path.join(ROOT, "train_nq.sh")], capture_output=True, text=True,
                          env=dict(os.environ, PATH=fake_deepspeed(tmp_path), **env), timeout=120)


def test_train_nq_sh_asks_the_names_module(tmp_path):
    # the .Q8_0 bug: basename stripped .gguf only and looked for x.Q8_0_20total_docs_...
    proc = train_nq(tmp_path, MODEL="models/x.Q8_0.gguf")
    assert proc.returncode == 0, proc.stderr
    assert f"--dataset {dataset_name('x', 20, 4, 1, 400)} " in proc.stdout
    proc = train_nq(tmp_path, MODEL="x.gguf", FILTER="0", K="2", STRENGTHEN="0", NUM="8", TOTAL_DOCS="3")
    assert f"--dataset {dataset_name('x', 3, 2, 0, 8, filtered=False)} " in proc.stdout
    proc = train_nq(tmp_path, DATASET_NAME="../elsewhere")
    assert proc.returncode == 2 and "error: DATASET_NAME '../elsewhere'" in proc.stderr and "deepspeed" not in proc.stdout


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    ctxs = [{"title": f"T{j}", "text": f"passage {j}", "isgold": j == 0} for j in range(3)]
    write_jsonl(str(d / "nq.jsonl.gz"), [{"question": "q?", "answers": ["x"], "ctxs": ctxs}])
    (d / "summary.json").write_text("[]")
    return d


# every flag that names an output, in every script: (script, flag, other arguments, output folder flag)
CASES = [
    ("gen_advantageous_pos_for_R1.py", "--dataset_name", ["--input-path", "{d}/nq.jsonl.gz", "--total_doc", "3"],
     "--output-path"),
    ("gen_advantageous_pos_for_R1.py", "--model", ["--input-path", "{d}/nq.jsonl.gz", "--total_doc", "3"],
     "--output-path"),
    ("create_datasets.py", "--dataset_name", [], "--output_dir"),
    ("create_datasets.py", "--model_name", [], "--output_dir"),
    ("eval_data.py", "--dataset_name", ["--input-path", "{d}/nq.jsonl.gz", "--model", "m", "--total_doc", "3"],
     "--output-path"),
    ("eval_data.py", "--label", ["--input-path", "{d}/nq.jsonl.gz", "--model", "m", "--total_doc", "3"],
     "--output-path"),
    ("eval_data.py", "--model", ["--input-path", "{d}/nq.jsonl.gz", "--total_doc", "3"], "--output-path"),
    (os.path.join("kd", "train_kd.py"), "--dataset_name", ["--dataset", "d", "--pretrain", "m"], "--save_path"),
    (os.path.join("kd", "train_kd.py"), "--wandb_run_name", ["--dataset", "d", "--pretrain", "m"], "--save_path"),
    ("plot_positions.py", "--label", ["{d}/summary.json"], "--output"),
    ("compare_predictions.py", "--label", ["{d}/nq.jsonl.gz", "{d}/nq.jsonl.gz"], "--output"),
]


@pytest.mark.parametrize("script, flag, others, out_flag", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
@pytest.mark.parametrize("bad", ["../escape", "/tmp/abs-name", ".."])
def test_every_name_flag_refuses_paths(tmp_path, capsys, inputs, script, flag, others, out_flag, bad):
    main = load_script(script).main
    # --model is a path by design: its name (last component) is what must be plain
    value = {"../escape": "..", "/tmp/abs-name": "/", "..": "models/.."}[bad] if flag == "--model" else bad
    out = tmp_path / "out"
    values = [value, "b"] if script == "compare_predictions.py" else [value]  # --label A B
    argv = [a.format(d=inputs) for a in others] + [flag, *values, out_flag, str(out / "x.png")]
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("script", ["gen_advantageous_pos_for_R1.py", "eval_data.py"])
def test_model_name_is_checked_before_the_input_is_read(tmp_path, capsys, script):
    # flags first: a bad --model name is the error even when the input is missing
    argv = ["--input-path", str(tmp_path / "missing.jsonl"), "--total_doc", "3", "--model", "models/..",
            "--output-path", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        run_cli(load_script(script).main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: --model"), err
    assert not (tmp_path / "out").exists()
