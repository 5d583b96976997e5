"""Issue 17, classes 3 and 8: silent type coercion and bad values, refused in one line before any
model loads. The scripts' ``main`` runs in this process (under ``run_cli``) on tiny inputs."""

import argparse

import pytest

import create_datasets
import eval_data
import gen_advantageous_pos_for_R1 as stage1
import prepare_data
from hostile import TOTAL, assert_error, cli, jsonl, listing, litm, stage1_record, stage2_args, stage2_input  # noqa: F401
from kd import train_kd
from pos2distill.errors import UserError
from pos2distill.flag_types import harden_numbers, parse_float, parse_int
from pos2distill.metrics import score_prediction


# ---- class 3: silent type coercion --------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("answers", "Shakespeare", "'answers' must be a non-empty list of strings, got 'Shakespeare'"),
    ("answers", [1], "'answers' must hold strings only"),
    ("oracle_answer", None, "'oracle_answer' must be a string, got None"),
    ("question", 7, "'question' must be a string"),
    ("documents", ["text"], "'documents' must be a list of objects with a string 'text'"),
])
def test_stage2_field_types_name_file_line_and_field(field, value, expected, tmp_path, capsys):
    records = [stage1_record(0), stage1_record(1, **{field: value}), stage1_record(2)]
    source = jsonl(tmp_path / "s1.jsonl", records)
    line = assert_error(cli(create_datasets.main, stage2_args(source, tmp_path / "data"), capsys), expected)
    assert f"{source}:2:" in line
    assert not (tmp_path / "data").exists()


def test_train_dataset_question_must_be_a_string(tmp_path):
    from pos2distill.training_questions import training_questions

    path = jsonl(tmp_path / "s1.jsonl", [stage1_record(0), stage1_record(1, question=["q"])])
    with pytest.raises(UserError, match=r"s1.jsonl:2: 'question' must be a string"):
        training_questions(path)


def test_a_string_of_answers_is_never_scored_as_characters():
    """'I do not know' contains every letter of 'Shakespeare'... as characters, it passed the filter."""
    with pytest.raises(TypeError, match="list of strings"):
        score_prediction("I do not know", "Shakespeare")


# ---- class 8: bad values -------------------------------------------------------------------------

def test_answers_that_normalise_to_nothing_are_refused(tmp_path, tiny_model, capsys):
    data = jsonl(tmp_path / "nq.jsonl", [litm(0), litm(1, answers=["the", "."])])
    argv = ["--input-path", data, "--model", tiny_model, "--total_doc", TOTAL, "--output-path", tmp_path / "o"]
    line = assert_error(cli(stage1.main, argv, capsys), "normalise to nothing")
    assert f"{data}:2: 'answers' ['the', '.']" in line
    source = jsonl(tmp_path / "s1.jsonl", [stage1_record(0, answers=["An"])])
    assert_error(cli(create_datasets.main, stage2_args(source, tmp_path / "data"), capsys), "normalise to nothing")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1_0", "0x10", "1e999", "", "1,0"])
def test_strict_float_refuses_what_float_accepts(text):
    with pytest.raises(ValueError):
        parse_float(text)


def test_strict_numbers_accept_ordinary_values():
    assert [parse_float(t) for t in ("3e-6", "-1", ".5", "2.", "1E+3")] == [3e-6, -1.0, 0.5, 2.0, 1000.0]
    assert [parse_int(t) for t in ("-1", "+3", "20")] == [-1, 3, 20]
    with pytest.raises(ValueError):
        parse_int("2_0")


def test_harden_numbers_reaches_subcommands_and_keeps_other_types():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", type=str)
    sub = parser.add_subparsers(dest="cmd").add_parser("go")
    sub.add_argument("--rate", type=float)
    harden_numbers(parser)
    assert parser.parse_args(["go", "--rate", "0.5"]).rate == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["go", "--rate", "nan"])


@pytest.mark.parametrize("argv, flag", [
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "inf"], "--learning_rate"),
    (["--temperature", "1_0"], "--temperature"),
    (["--max_epochs", "1_0"], "--max_epochs"),
])
def test_training_flags_refused_while_parsing(argv, flag, tmp_path, capsys):
    status, err = cli(train_kd.main, ["--dataset", tmp_path, "--pretrain", "nope/x", *argv], capsys)
    assert status == 2 and f"argument {flag}:" in err and "Traceback" not in err, err


@pytest.mark.parametrize("coef", ["1_0,0,0,0", "0,0,0,nan", "0,0,0,1e999"])
def test_kd_coef_with_underscores_or_nan_is_refused(coef, tmp_path, capsys):
    assert_error(cli(train_kd.main, ["--dataset", tmp_path, "--pretrain", "nope/x", "--kd_coef", coef], capsys),
                 "--kd_coef must be four non-negative numbers")


@pytest.mark.parametrize("argv, expected", [
    (["--learning_rate=-1e-5"], "--learning_rate must be positive"),
    (["--lr_warmup_ratio", "2"], "--lr_warmup_ratio must be in [0, 1]"),
])
def test_training_values_out_of_range(argv, expected, tmp_path, capsys):
    assert_error(cli(train_kd.main, ["--dataset", tmp_path, "--pretrain", "nope/x", *argv], capsys), expected)


@pytest.mark.parametrize("main, argv, flag", [
    (stage1.main, ["--temperature", "nan"], "--temperature"),
    (stage1.main, ["--total_doc", "2_0"], "--total_doc"),
    (eval_data.main, ["--sample_num", "1_0"], "--sample_num"),
])
def test_generation_flags_refused_while_parsing(main, argv, flag, tmp_path, capsys):
    status, err = cli(main, ["--input-path", "x.jsonl", "--model", "m", *argv], capsys)
    assert status == 2 and f"argument {flag}:" in err, err


def test_stage1_sampling_values_out_of_range(tmp_path, capsys):
    base = ["--input-path", "x.jsonl", "--model", "m", "--output-path", tmp_path / "o"]
    assert_error(cli(stage1.main, base + ["--top_p", "0"], capsys), "--top_p must be in (0, 1]")
    assert_error(cli(stage1.main, base + ["--temperature", "-1"], capsys), "--temperature must be at least 0")


def test_prepare_data_writing_no_records_is_an_error(tmp_path, capsys):
    oracle = jsonl(tmp_path / "oracle.jsonl", [litm(i, n=1) for i in range(2)])
    out = tmp_path / "out"
    line = assert_error(cli(prepare_data.main, ["nq", "--oracle", oracle, "--total_doc", 20,
                                                "--output", out / "nq.jsonl"], capsys), "no question could be built")
    assert "skipped 2 question(s)" in line
    assert_error(cli(prepare_data.main, ["kv", "--num_examples", 0, "--output", out / "kv.jsonl"], capsys),
                 "--num_examples must be at least 1")
    assert not out.exists()


def test_user_error_is_what_stage2_raises_for_a_null_oracle_answer():
    from pos2distill.pairs import select_correct

    with pytest.raises(UserError, match="f:1: 'oracle_answer' must be a string"):
        select_correct([("f:1", stage1_record(0, oracle_answer=None))], 1, TOTAL)
