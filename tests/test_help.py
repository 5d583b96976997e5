"""--help everywhere: the shell scripts answer at once and touch nothing; every stage CLI flag
has a help line that states its default."""

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from pos2distill.cli_help import HelpFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.sh"))]
    + ["gen_advantageous_pos_for_R1.sh", "train_nq.sh", "eval_data.sh"]
)
CLIS = ["gen_advantageous_pos_for_R1.py", "create_datasets.py", os.path.join("kd", "train_kd.py"), "eval_data.py",
        "prepare_data.py", "plot_positions.py", "compare_predictions.py"]
# Programs a script would run once past its help: each leaves a marker, so a test can tell.
TOOLS = ("python", "python3", "pip", "deepspeed", "curl", "nvidia-smi")


def _copy_scripts(dest):
    for rel in SCRIPTS + ["scripts/lib/usage.sh"]:
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), os.path.join(dest, rel))


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_script_help_runs_nothing(tmp_path, script, flag):
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    _copy_scripts(repo)
    bin_dir.mkdir()
    for tool in TOOLS:
        fake = bin_dir / tool
        fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran-{tool}\nexit 1\n")
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    before = _tree(repo)
    started = time.perf_counter()
    result = subprocess.run(["bash", script, flag], cwd=repo, env=env, capture_output=True, text=True, timeout=30)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
    assert os.path.basename(script) in result.stdout.splitlines()[0]
    assert _tree(repo) == before and not list(tmp_path.glob("ran-*")), "--help ran or wrote something"
    assert seconds < 5
    # Every knob the script reads as VAR=${VAR:-default} is listed with its default.
    source = open(os.path.join(ROOT, script)).read()
    knobs = re.findall(r"^([A-Za-z_]\w*)=\$\{\1:-", source, flags=re.M)
    for knob in knobs:
        assert re.search(rf"^  {knob}=\S*", result.stdout, flags=re.M), (knob, result.stdout)


def test_demo_help_lists_its_knobs():
    """The demo's knobs, each on its own line, so the help (and the README) can name them."""
    source = open(os.path.join(ROOT, "scripts", "demo.sh")).read()
    for knob in ("WORK", "TOTAL_DOC", "STAGE1_NUM", "EXAMPLE_NUM", "EVAL_NUM", "NQ_ORACLE", "LR", "REDO"):
        assert re.search(rf"^{knob}=\$\{{{knob}:-", source, flags=re.M), knob


def _parsers(cli):
    spec = importlib.util.spec_from_file_location("cli_" + os.path.basename(cli)[:-3], os.path.join(ROOT, cli))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    found = [parser]
    for action in parser._actions:  # prepare_data.py: one parser per sub-command
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.values())
    return found


@pytest.mark.parametrize("cli", CLIS)
def test_every_flag_has_help_and_default(cli):
    for parser in _parsers(cli):
        assert parser.formatter_class is HelpFormatter, parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{cli} {parser.prog}: {name} has no help"
            if action.option_strings and not action.required:
                assert "default" in formatter._get_help_string(action).lower(), f"{cli}: {name} shows no default"


def test_formatter_states_defaults_once():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--n", type=int, default=7, help="how many")
    parser.add_argument("--name", default=None, help="a name (default: the file's)")
    parser.add_argument("--path", required=True, help="where")
    text = parser.format_help()
    assert "how many (default: 7)" in text
    assert text.count("default") == 2 and "(default: None)" not in text


@pytest.mark.parametrize("cli", [os.path.join("kd", "train_kd.py"), "eval_data.py"])
def test_cli_help_is_fast_and_exits_zero(cli):
    """kd/train_kd.py --help without the deepspeed launcher, and without importing torch."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, cli, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(default: " in result.stdout and not result.stderr
    if cli.startswith("kd"):
        assert time.perf_counter() - started < 10


@pytest.mark.parametrize("script, argv", [
    ("eval_data.py", ["--sample_num", "nan"]),
    ("prepare_data.py", ["kv", "--num_keys", "1_0", "--output", "x.jsonl"]),
    ("kd/train_kd.py", ["--dataset", "d", "--pretrain", "m", "--learning_rate", "inf"]),
    ("compare_predictions.py", ["a.jsonl"]),
])
def test_a_bad_flag_is_one_error_line(script, argv, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert not os.listdir(tmp_path)  # nothing written
