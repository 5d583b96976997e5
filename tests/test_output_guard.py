"""Issue 17, classes 1, 2, 4, 6 and 7: two runs on one output, an output that is an input, silent
replacement, tools that trust their inputs, OS errors and broken models. Each case runs the real
script's ``main`` in this process (under ``run_cli``) on tiny inputs; none loads a model."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import compare_predictions
import create_datasets
import eval_data
import gen_advantageous_pos_for_R1 as stage1
import plot_positions
import prepare_data
from hostile import TOTAL, assert_error, cli, jsonl, listing, litm, stage1_record, stage2_args, stage2_input  # noqa: F401
from kd import train_kd
from pos2distill.errors import UserError
from pos2distill.jsonl import AtomicJsonlWriter
from pos2distill.model_check import check_model_folder
from pos2distill.names import checkpoint_name, overlay_prefix
from pos2distill.output_guard import NAME_MAX, NAME_RESERVE, OutputLock, fit_name
from pos2distill.resumable import ChunkedOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_model(*_, **__):
    raise AssertionError("a model was loaded before the output was checked")


@pytest.fixture
def guarded(monkeypatch):
    """Any model load fails the test: every check here must come before one."""
    monkeypatch.setattr(stage1, "open_backend", no_model)
    monkeypatch.setattr(eval_data, "open_backend", no_model)


# ---- class 1: two runs on one output ---------------------------------------------------------

def stage_cases(tmp_path, tiny_model):
    good = jsonl(tmp_path / "nq-good.jsonl", [litm(i) for i in range(3)])
    gen = ["--input-path", good, "--model", tiny_model, "--backend", "hf", "--total_doc", TOTAL]
    out = tmp_path / "out"
    return {
        "stage1": (stage1.main, gen + ["--output-path", out / "s1.jsonl.gz"], out / "s1.jsonl.gz"),
        "stage4": (eval_data.main, gen + ["--output-path", out, "--label", "base"], out / "nq" / "base"),
        "prepare": (prepare_data.main, ["kv", "--num_examples", 2, "--num_keys", 3, "--output", out / "kv.jsonl"],
                    out / "kv.jsonl"),
    }


@pytest.mark.parametrize("stage", ["stage1", "stage4", "prepare"])
def test_second_run_on_one_output_is_refused_naming_the_first(stage, tmp_path, tiny_model, capsys, guarded):
    main, argv, output = stage_cases(tmp_path, tiny_model)[stage]
    with OutputLock(str(output)):  # run A, still writing
        line = assert_error(cli(main, argv, capsys), "is being written by another run")
    assert f"pid {os.getpid()}" in line and "wait for it to finish or choose another output" in line
    assert not os.path.exists(str(output) + ".partial")


def test_second_stage2_and_training_run_are_refused(tmp_path, stage2_input, capsys):
    out = tmp_path / "data"
    name = "m_4total_docs_filter_2random_1strengthen_2"
    with OutputLock(str(out / name)):
        assert_error(cli(create_datasets.main, stage2_args(stage2_input, out), capsys), "being written by another run")
    (tmp_path / "ds").mkdir()
    save = tmp_path / "save"
    run = checkpoint_name(str(tmp_path / "ds"), (0.0, 0.0, 0.0, 1.0), 1.0)
    argv = ["--dataset", tmp_path / "ds", "--pretrain", "nope/x", "--save_path", save]
    with OutputLock(str(save / run)):
        assert_error(cli(train_kd.main, argv, capsys), "being written by another run")
    ckpt = tmp_path / "ckpt"  # DeepSpeed checkpoints of another run (the default path is shared)
    with OutputLock(str(ckpt)):
        assert_error(cli(train_kd.main, argv + ["--ckpt_path", ckpt, "--save_steps", 5], capsys),
                     f"{ckpt} is being written by another run")


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    """flock dies with its process: a SIGKILLed run never blocks the next one."""
    path = str(tmp_path / "out.jsonl")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pos2distill.output_guard import OutputLock;"
        "OutputLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"), ROOT, path],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid} on "):
            OutputLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputLock(path):
        pass
    assert listing(tmp_path) == []  # the lock file goes with the lock


def test_resume_refuses_chunks_written_under_other_arguments(tmp_path):
    path = str(tmp_path / "out.jsonl.gz")
    run_a = ChunkedOutput(path, {"temperature": 0.7})
    run_a.write_chunk(0, [{"x": 1}])
    shutil.rmtree(path + ".partial")  # what run B (other arguments) did before the lock existed
    ChunkedOutput(path, {"temperature": 1.5}).write_chunk(0, [{"x": 2}])
    with pytest.raises(UserError, match="chunks written under other arguments"):
        run_a.write_chunk(1, [{"x": 3}])
    with pytest.raises(UserError, match="chunks written under other arguments"):
        run_a.finalize(1)
    assert not os.path.exists(path)


# ---- class 2: an output that is an input -------------------------------------------------------

def test_prepare_data_output_equal_to_oracle_is_refused(tmp_path, capsys, monkeypatch):
    oracle = jsonl(tmp_path / "oracle.jsonl", [litm(i, n=1) for i in range(3)])
    before = open(oracle, "rb").read()
    os.symlink(tmp_path, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for output in (oracle, "oracle.jsonl", str(tmp_path / "link" / "oracle.jsonl")):
        line = assert_error(cli(prepare_data.main, ["nq", "--oracle", oracle, "--total_doc", 1, "--output", output],
                                capsys), "is the same file as --oracle")
        assert "--output" in line
    assert open(oracle, "rb").read() == before


def test_stage1_output_equal_to_input_is_refused(tmp_path, tiny_model, capsys, guarded):
    good = jsonl(tmp_path / "nq.jsonl.gz", [litm(i) for i in range(3)])
    argv = ["--input-path", good, "--model", tiny_model, "--total_doc", TOTAL, "--output-path", good]
    assert_error(cli(stage1.main, argv, capsys), "is the same file as --input-path")


def existing_training_folder(tmp_path, **files):
    """A dataset folder ``ds`` and the model folder a training on it saves, already there with ``files``."""
    (tmp_path / "ds").mkdir()
    folder = tmp_path / "save" / checkpoint_name(str(tmp_path / "ds"), (0.0, 0.0, 0.0, 1.0), 1.0)
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def test_training_into_its_own_model_folder_is_refused(tmp_path, capsys):
    model = existing_training_folder(tmp_path, config__json="{}")
    argv = ["--dataset", tmp_path / "ds", "--pretrain", model, "--save_path", tmp_path / "save", "--overwrite"]
    assert_error(cli(train_kd.main, argv, capsys), "is the same file as --pretrain")
    assert (model / "config.json").exists()


# ---- class 4: silent replacement ----------------------------------------------------------------

def test_stage2_refuses_to_replace_a_dataset_built_from_other_rows(tmp_path, stage2_input, capsys):
    # another seed has its own name now (_seed7); other rows under the same name come from another stage-1 file
    out = tmp_path / "data"
    folder = out / "m_4total_docs_filter_2random_1strengthen_2"
    other = jsonl(tmp_path / "other" / "m_4docs_0.jsonl.gz", [stage1_record(i) for i in (2, 1, 0)])
    assert cli(create_datasets.main, stage2_args(stage2_input, out), capsys)[0] == 0
    assert cli(create_datasets.main, stage2_args(stage2_input, out), capsys)[0] == 0  # same rows: a rerun
    assert cli(create_datasets.main, stage2_args(stage2_input, out, "--seed", 7), capsys)[0] == 0
    assert (out / "m_4total_docs_filter_2random_1strengthen_2_seed7").is_dir()  # its own folder
    first = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    line = assert_error(cli(create_datasets.main, stage2_args(other, out), capsys), "was made with other arguments")
    assert "--overwrite" in line
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == first
    (folder / "my_notes.txt").write_text("mine")
    line = assert_error(cli(create_datasets.main, stage2_args(other, out, "--overwrite"), capsys),
                        "holds files this project did not write (my_notes.txt)")
    (folder / "my_notes.txt").unlink()
    assert cli(create_datasets.main, stage2_args(other, out, "--overwrite"), capsys)[0] == 0
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} != first


def test_training_refuses_an_existing_model_folder(tmp_path, capsys):
    folder = existing_training_folder(tmp_path, model__safetensors="old weights", eval_notes__md="not ours")
    argv = ["--dataset", tmp_path / "ds", "--pretrain", "nope/x", "--save_path", tmp_path / "save"]
    assert_error(cli(train_kd.main, argv, capsys), "exists; pass --overwrite to replace it")
    assert_error(cli(train_kd.main, argv + ["--overwrite"], capsys), "did not write (eval_notes.md)")
    assert sorted(os.listdir(folder)) == ["eval_notes.md", "model.safetensors"]


# ---- class 6: tools that trust their inputs -----------------------------------------------------

def test_plot_positions_refuses_to_overwrite_its_input(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([{"label": "x", "positions": [0], "n": {"0": 1}, "accuracy": {"0": 1.0},
                                    "ci95": {"0": [0, 1]}}]))
    before = summary.read_bytes()
    assert_error(cli(plot_positions.main, [summary, "--output", tmp_path / "summary.png"], capsys),
                 "--output (its .json)")
    assert summary.read_bytes() == before and not (tmp_path / "summary.png").exists()


def test_compare_predictions_refuses_other_questions(tmp_path, capsys):
    def predictions(name, question):
        return jsonl(tmp_path / name, [{"example_id": i, "gold_idx": p, "correct": True, "question": question(i)}
                                       for i in range(3) for p in range(2)])

    a = predictions("a.jsonl", lambda i: f"q{i}")
    b = predictions("b.jsonl", lambda i: f"other{i}")
    line = assert_error(cli(compare_predictions.main, [a, b], capsys), "ask other questions under the same example ids")
    assert "3 differ" in line and "'q0' vs 'other0'" in line
    bad = jsonl(tmp_path / "c.jsonl", [{"example_id": 0, "gold_idx": 0, "correct": "false", "question": "q0"}])
    assert_error(cli(compare_predictions.main, [bad, bad], capsys), "'correct' must be a boolean")


# ---- class 7: OS errors and broken models, before any model loads -------------------------------

def test_unwritable_output_folder_is_found_before_the_model_loads(tmp_path, tiny_model, capsys, guarded, monkeypatch):
    readonly = str(tmp_path / "ro")
    os.mkdir(readonly)
    real_open = os.open

    def deny(path, *args, **kwargs):  # tests run as root, where chmod 555 does not stop writes
        if str(path).startswith(readonly):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    good = jsonl(tmp_path / "nq.jsonl", [litm(i) for i in range(3)])
    gen = ["--input-path", good, "--model", tiny_model, "--total_doc", TOTAL, "--backend", "hf", "--output-path"]
    assert_error(cli(eval_data.main, gen + [readonly], capsys), "Permission denied")
    assert_error(cli(stage1.main, gen + [readonly], capsys), "Permission denied")
    assert_error(cli(stage1.main, gen + [readonly, "--gold_doc", "auto"], capsys), "Permission denied")
    assert listing(readonly) == []


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.tmp_path)

    monkeypatch.setattr(AtomicJsonlWriter, "write", full)
    out = tmp_path / "out"
    out.mkdir()
    assert_error(cli(prepare_data.main, ["kv", "--num_examples", 2, "--output", out / "kv.jsonl"], capsys),
                 "No space left on device (disk full)")
    assert listing(out) == []


def test_output_path_of_the_wrong_kind(tmp_path, tiny_model, capsys, guarded):
    a_file = tmp_path / "taken"
    a_file.write_text("user data")
    good = jsonl(tmp_path / "nq.jsonl", [litm(i) for i in range(3)])
    gen = ["--input-path", good, "--model", tiny_model, "--total_doc", TOTAL, "--backend", "hf"]
    assert_error(cli(eval_data.main, gen + ["--output-path", a_file], capsys), "exists and is a file")
    assert_error(cli(stage1.main, gen + ["--output-path", a_file / "sub"], capsys), "exists and is a file")
    assert_error(cli(prepare_data.main, ["kv", "--output", tmp_path], capsys), "is a folder")
    assert a_file.read_text() == "user data"


def test_long_names_are_shortened_deterministically_or_refused(tmp_path, capsys):
    labels = ["a-very-long-model-label-" + "x" * 60 + str(i) for i in range(3)]
    args = eval_data.parse_args(["--input-path", "x", "--model", "m", "--output-path", str(tmp_path)])
    prefix = os.path.basename(overlay_prefix(args.output_path, "nq", args.total_doc, labels))
    assert len(prefix.encode()) <= NAME_MAX - NAME_RESERVE and prefix.startswith("positions_20docs_a-very-long")
    assert prefix == os.path.basename(overlay_prefix(args.output_path, "nq", args.total_doc, labels))
    assert prefix != os.path.basename(overlay_prefix(args.output_path, "nq", args.total_doc, labels[:2] + ["other"]))
    assert fit_name("short") == "short" and len(fit_name("é" * 200).encode()) <= NAME_MAX - NAME_RESERVE
    assert_error(cli(prepare_data.main, ["kv", "--output", tmp_path / ("k" * 250 + ".jsonl")], capsys),
                 "file name too long")


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


def test_broken_model_folders_are_refused_before_loading(model_copy, tmp_path, capsys, guarded):
    check_model_folder(str(model_copy))  # the intact copy passes
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated safetensors file: the header needs"):
        check_model_folder(str(model_copy))
    weights.write_bytes(data[:4])
    with pytest.raises(UserError, match="truncated safetensors file"):
        check_model_folder(str(model_copy))
    weights.unlink()
    with pytest.raises(UserError, match="no weights in the model folder"):
        check_model_folder(str(model_copy))
    weights.write_bytes(data)
    (model_copy / "tokenizer.json").unlink()
    good = jsonl(tmp_path / "nq.jsonl", [litm(i) for i in range(3)])
    argv = ["--input-path", good, "--model", model_copy, "--total_doc", TOTAL, "--output-path", tmp_path / "o"]
    assert_error(cli(stage1.main, argv, capsys), "no tokenizer in the model folder")
    assert not (tmp_path / "o").exists()
