"""scripts/setup.sh's opt-in vLLM install: which vLLM goes with which torch, without installing."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "vllm_for_torch.py")
spec = importlib.util.spec_from_file_location("vllm_for_torch", SCRIPT)
vllm_for_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vllm_for_torch)


@pytest.mark.parametrize("torch_version, transformers_version, release", [
    ("2.11.0+cu130", "5.24.0", "0.26.0"),   # the H200 machine's torch
    ("2.11.0", "5.5.3", "0.26.0"),
    ("2.13.0+cu128", "5.24.0", "0.30.0"),   # 0.31.0 and 0.32.0 cap transformers below 5.23
    ("2.13.0", "5.17.0", "0.32.0"),
    ("2.14.0", "5.22.1", "0.34.0"),
])
def test_the_newest_release_for_torch_and_transformers(torch_version, transformers_version, release):
    assert vllm_for_torch.vllm_for(torch_version, transformers_version) == release


@pytest.mark.parametrize("torch_version, transformers_version, message", [
    ("2.12.0", "5.24.0", "no known vLLM release requires torch 2.12.0"),
    ("2.14.0", "5.24.0", "no known vLLM release for torch 2.14.0 accepts the installed transformers 5.24.0"),
    ("2.13.0+cpu", "5.24.0", "vLLM needs a CUDA build of torch"),
])
def test_no_release_is_an_error(torch_version, transformers_version, message):
    with pytest.raises(vllm_for_torch.NoMatch, match=re.escape(message)):
        vllm_for_torch.vllm_for(torch_version, transformers_version)


def test_the_table_agrees_with_the_recorded_wheel():
    with open(os.path.join(ROOT, "tests", "data", "vllm_api_0.26.0.json"), encoding="utf-8") as fh:
        recorded = json.load(fh)
    pin, transformers_range = vllm_for_torch.VLLM_RELEASES[recorded["version"]]
    assert recorded["requires"] == {"torch": f"=={pin}", "transformers": transformers_range}


def _run(*args, env=None):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_dry_run_prints_pip_with_torch_held():
    proc = _run(sys.executable, SCRIPT, "--torch", "2.11.0+cu130", "--transformers", "5.24.0", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    command = next(line for line in proc.stdout.splitlines() if " -m pip install " in line)
    assert "vllm==0.26.0" in command.split() and "-c" in command.split()
    assert "torch==2.11.0+cu130" in proc.stdout.splitlines() and "transformers==5.24.0" in proc.stdout.splitlines()
    failed = _run(sys.executable, SCRIPT, "--torch", "2.12.0", "--transformers", "5.24.0", "--dry_run")
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: no known vLLM release")


def _setup_block() -> str:
    with open(os.path.join(ROOT, "scripts", "setup.sh"), encoding="utf-8") as fh:
        text = fh.read()
    match = re.search(r"^# ---- vLLM, opt-in.*?^# ---- end vLLM -*$", text, re.S | re.M)
    assert match, "scripts/setup.sh has no delimited vLLM block"
    return match.group(0)


def test_setup_block_runs_only_when_asked(tmp_path):
    block = _setup_block()
    shim = tmp_path / "python"  # `python` in the block: this interpreter, the machine's installed torch
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    skipped = _run("bash", "-c", "set -euo pipefail\n" + block, env=env)
    assert (skipped.returncode, skipped.stdout, skipped.stderr) == (0, "", "")
    asked = _run("bash", "-c", "set -euo pipefail\n" + block, env=dict(env, WITH_VLLM="1", VLLM_DRY_RUN="1"))
    from importlib.metadata import version

    torch_version = version("torch")
    try:
        vllm_for_torch.vllm_for(torch_version, version("transformers"))
    except vllm_for_torch.NoMatch as err:  # e.g. this CPU machine's torch: one line, exit 2
        assert asked.returncode == 2 and asked.stderr == f"error: {err}\n"
    else:
        assert asked.returncode == 0 and f"torch=={torch_version}" in asked.stdout.splitlines()
