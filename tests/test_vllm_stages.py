"""Stages 1 and 4 on the vLLM backend (the tests/fake_vllm stand-in): one engine per model, what
reaches vLLM, ``--backend auto``, and the backend and versions in every output's config."""

import json
import os
import sys

import pytest

import eval_data
import gen_advantageous_pos_for_R1 as stage1
from pos2distill.generation import backend_config, vllm_backend
from pos2distill.errors import UserError
from pos2distill.jsonl import read_jsonl, write_jsonl

TOTAL = 4
EXAMPLES = 12


@pytest.fixture
def data(tmp_path):
    records = []
    for i in range(EXAMPLES):
        ctxs = [{"title": f"T{i}.{j}", "text": f"passage {j} of question {i}", "isgold": j == 0} for j in range(TOTAL)]
        records.append({"question": f"question {i}?", "answers": [f"answer{i}"], "ctxs": ctxs})
    path = str(tmp_path / "nq-small.jsonl")
    write_jsonl(path, records)
    return path


def stage1_args(data, out, *extra):
    return ["--input-path", data, "--output-path", str(out), "--total_doc", TOTAL, "--max-new-tokens", 8,
            "--chunk_size", 4, "--num_gpus", 1, *extra]


def run(module, args):
    assert module.main([str(a) for a in args]) == 0


def _config(path: str) -> dict:
    with open(path + ".config.json", encoding="utf-8") as fh:
        return json.load(fh)


def test_stage1_on_vllm_one_engine_seeds_and_newline_stop(fake_vllm, tiny_model, data, tmp_path):
    out = tmp_path / "s1.jsonl.gz"
    args = stage1_args(data, out, "--model", tiny_model, "--backend", "vllm", "--gold_doc", "auto",
                       "--probe_num", 4, "--eval_holdout", 4, "--seed", 5)
    run(stage1, args)
    assert len(fake_vllm.events("init")) == 1  # the probe and every chunk share one engine
    calls = fake_vllm.events("generate")
    probe = [c for c in calls if c["params"][0]["temperature"] == 0.0]
    sampled = [c for c in calls if c["params"][0]["temperature"] > 0]
    # the probe puts all its positions into one call (at most 2,048 prompts); sampling one call per chunk
    assert len(probe) == 1 and len(probe[0]["prompts"]) == TOTAL * 4 and len(sampled) == EXAMPLES // 4
    seeds = [p["seed"] for c in sampled for p in c["params"]]
    assert len(set(seeds)) == EXAMPLES and all(s is not None for s in seeds)  # one seed per prompt
    assert all(p["stop"] == ["\n"] and p["include_stop_str_in_output"] for c in calls for p in c["params"])
    config = _config(str(out))
    assert config["backend"] == "vllm"
    assert config["software"]["vllm"] == "0.26.0+fake" and config["software"]["torch"]
    with open(str(out).replace(".jsonl.gz", ".summary.json"), encoding="utf-8") as fh:
        assert json.load(fh)["config"]["software"] == config["software"]

    first = read_jsonl(str(out))
    fake_vllm.clear()
    os.remove(out)  # a rerun with the same seed writes the same file
    run(stage1, args)
    assert read_jsonl(str(out)) == first
    assert [p["seed"] for c in fake_vllm.events("generate") if c["params"][0]["temperature"] > 0
            for p in c["params"]] == seeds


def test_a_resume_with_another_backend_or_vllm_starts_over(fake_vllm, tiny_model, data, tmp_path, monkeypatch,
                                                           capsys):
    import vllm

    out = tmp_path / "s1.jsonl.gz"
    args = stage1_args(data, out, "--model", tiny_model, "--gold_doc", 0, "--temperature", 0)
    real_generate, calls = vllm_backend.VLLMBackend.generate, []

    def dies_in_chunk_2(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(self, *a, **k)

    monkeypatch.setattr(vllm_backend.VLLMBackend, "generate", dies_in_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        run(stage1, args + ["--backend", "vllm"])
    monkeypatch.setattr(vllm_backend.VLLMBackend, "generate", real_generate)
    assert os.listdir(str(out) + ".partial")  # chunk 0 made by vLLM

    monkeypatch.setattr(vllm, "__version__", "0.27.0")  # another vLLM: its chunks are not vLLM 0.26.0's
    fake_vllm.clear()
    run(stage1, args + ["--backend", "vllm"])
    assert "made with other arguments; starting over" in capsys.readouterr().out
    assert sum(len(c["prompts"]) for c in fake_vllm.events("generate")) == EXAMPLES  # chunk 0 again too
    assert _config(str(out))["software"]["vllm"] == "0.27.0"

    run(stage1, args + ["--backend", "hf"])  # the same arguments on the other backend: recomputed
    records = read_jsonl(str(out))
    from vllm import default_completion

    assert not any(r["oracle_answer"].startswith(default_completion([])[:7]) for r in records)  # no fake answers
    assert _config(str(out))["backend"] == "hf" and "vllm" not in _config(str(out))["software"]


def test_stage4_one_engine_per_model_and_auto(fake_vllm, tiny_model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(backend_config, "_cuda_available", lambda: True)  # --backend auto: a GPU, and vLLM imports
    run(eval_data, ["--input-path", data, "--model", tiny_model, tiny_model, "--label", "a", "b",
                    "--output-path", tmp_path, "--dataset_name", "nq", "--total_doc", TOTAL, "--positions", "0,1,3",
                    "--sample_num", 5, "--max-new-tokens", 8, "--num_gpus", 1, "--backend", "auto"])
    inits = fake_vllm.events("init")
    assert len(inits) == 2  # one per model, not per position
    assert len(fake_vllm.events("generate")) == 2 * 3
    for label in ("a", "b"):
        folder = tmp_path / "nq" / label
        config = _config(str(folder / f"predictions_{TOTAL}docs.jsonl.gz"))
        assert config["backend"] == "vllm" and config["software"]["vllm"] == "0.26.0+fake"
        with open(folder / f"summary_{TOTAL}docs.json", encoding="utf-8") as fh:
            (summary,) = json.load(fh)
        assert summary["backend"] == "vllm" and summary["software"] == config["software"]


def test_auto_takes_hf_when_vllm_does_not_import(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken" / "vllm"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libtorch_cuda.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(backend_config, "_cuda_available", lambda: True)
    assert backend_config.resolve_backend_name("auto") == "hf"
    assert "vLLM is installed but does not import (ImportError: libtorch_cuda.so" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"but it does not import \(ImportError: libtorch_cuda.so"):
        backend_config.resolve_backend_name("vllm")
