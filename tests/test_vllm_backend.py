"""The vllm adapter on a stand-in vllm (``tests/fake_vllm``, first on sys.path and PYTHONPATH, so
the data-parallel worker processes import it too; it logs every call)."""

import multiprocessing
import os

import pytest

from conftest import MESSAGES
from pos2distill.errors import UserError
from pos2distill.generation.factory import make_backend
from pos2distill.generation.vllm_backend import request_seed
from pos2distill.metrics import first_line
from pos2distill.prompting import chat_prompt


def _prompt_ids(tokenizer, prompts):
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def test_vllm_single_engine_passes_parameters(fake_vllm, tiny_model):
    from vllm import default_completion

    backend = make_backend("vllm", tiny_model, num_gpus=1, dtype="bf16", seed=7, max_model_len=4096)
    try:
        assert backend.name == "vllm" and backend.data_parallel_size == 1
        (init,) = fake_vllm.events("init")
        assert init["pid"] == os.getpid()  # one engine runs in this process
        assert init["model"] == tiny_model
        assert init["kwargs"] == {"tensor_parallel_size": 1, "dtype": "bfloat16", "seed": 7, "max_model_len": 4096}

        prompts = [chat_prompt(backend.tokenizer, m) for m in MESSAGES]
        ids = _prompt_ids(backend.tokenizer, prompts)
        out = backend.generate(prompts, max_new_tokens=100, temperature=0.7, top_p=0.95, seed=3)
        assert out == [default_completion(i) for i in ids]
        (call,) = fake_vllm.events("generate")
        assert call["prompts"] == [{"prompt_token_ids": i} for i in ids]  # no BOS added twice
        assert call["use_tqdm"] is True
        for p in call["params"]:
            assert (p["temperature"], p["top_p"], p["max_tokens"], p["stop"]) == (0.7, 0.95, 100, None)
        seeds = [p["seed"] for p in call["params"]]
        assert len(set(seeds)) == len(prompts)  # one seed per prompt, derived from the call's seed
        assert backend.last_stats["prompts"] == len(prompts)
        assert backend.last_stats["new_tokens"] == sum(len(o) + 1 for o in out)  # + EOS

        fake_vllm.clear()
        backend.generate(prompts, max_new_tokens=100, temperature=0.7, top_p=0.95, seed=3)
        assert [p["seed"] for p in fake_vllm.events("generate")[0]["params"]] == seeds
        fake_vllm.clear()
        backend.generate(prompts, max_new_tokens=100, temperature=0.7, top_p=0.95, seed=4)
        assert [p["seed"] for p in fake_vllm.events("generate")[0]["params"]] != seeds

        fake_vllm.clear()
        backend.generate(prompts, max_new_tokens=20, stop_at_newline=True)
        for p in fake_vllm.events("generate")[0]["params"]:
            assert p["temperature"] == 0.0 and p["max_tokens"] == 20 and p["seed"] is None
            assert p["stop"] == ["\n"] and p["include_stop_str_in_output"] is True
        assert backend.count_tokens(prompts) == [len(i) for i in ids]
    finally:
        backend.close()


def test_vllm_tensor_parallel(fake_vllm, tiny_model):
    backend = make_backend("vllm", tiny_model, num_gpus=4, tensor_parallel_size=4)
    try:
        assert (backend.tensor_parallel_size, backend.data_parallel_size) == (4, 1)
        (init,) = fake_vllm.events("init")
        assert init["pid"] == os.getpid() and init["kwargs"]["tensor_parallel_size"] == 4
        assert "max_model_len" not in init["kwargs"]  # vLLM's own default unless asked
    finally:
        backend.close()
    fake_vllm.clear()
    backend = make_backend("vllm", tiny_model, num_gpus=1, max_model_len=40_000)
    try:
        # above the tiny model's 8192-token window: vLLM would refuse it
        assert fake_vllm.events("init")[0]["kwargs"]["max_model_len"] == 8192
    finally:
        backend.close()


def test_vllm_data_parallel_keeps_order(fake_vllm, tiny_model, monkeypatch):
    from vllm import default_completion

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    backend = make_backend("vllm", tiny_model, num_gpus=4, tensor_parallel_size=2, seed=5)
    try:
        assert (backend.tensor_parallel_size, backend.data_parallel_size) == (2, 2)
        inits = fake_vllm.events("init")
        assert sorted(e["cuda_visible_devices"] for e in inits) == ["2,3", "5,7"]
        assert all(e["pid"] != os.getpid() for e in inits) and len({e["pid"] for e in inits}) == 2
        assert all(e["kwargs"] == {"tensor_parallel_size": 2, "dtype": "auto", "seed": 5} for e in inits)

        prompts = [f"question {i}: " + "word " * (i % 4) for i in range(11)]
        ids = _prompt_ids(backend.tokenizer, prompts)
        out = backend.generate(prompts, max_new_tokens=50, temperature=0.5, seed=9)
        assert out == [default_completion(i) for i in ids]
        calls = sorted(fake_vllm.events("generate"), key=lambda e: e["cuda_visible_devices"])
        shards = [[p["prompt_token_ids"] for p in call["prompts"]] for call in calls]
        assert shards == [ids[:6], ids[6:]]  # contiguous shards, in order
        assert [call["use_tqdm"] for call in calls] == [True, False]
        seeds = [p["seed"] for call in calls for p in call["params"]]
        assert seeds == [request_seed(9, i) for i in range(len(prompts))]
        assert backend.last_stats["prompts"] == len(prompts)
    finally:
        backend.close()
    assert all(not p.is_alive() for p in multiprocessing.active_children())


def test_vllm_leading_newline_does_not_stop(fake_vllm, tiny_model):
    backend = make_backend("vllm", tiny_model, num_gpus=1)
    try:
        prompts = ["p0", "p1", "p2", "p3", "p4"]
        keys = [" ".join(map(str, i)) for i in _prompt_ids(backend.tokenizer, prompts)]
        fake_vllm.script({
            keys[0]: "Paris\nmore text",
            keys[1]: "\n\n  Paris\nmore",
            keys[2]: " \n",
            keys[3]: "\n" * 50,
            keys[4]: "no newline at all",
        })
        out = backend.generate(prompts, max_new_tokens=12, stop_at_newline=True)
        assert out == ["Paris\n", "\n\n  Paris\n", " \n", "\n" * 12, "no newline a"]
        assert [first_line(o) for o in out] == ["Paris", "Paris", "", "", "no newline a"]
        calls = fake_vllm.events("generate")
        # Rows that stopped on a leading newline are resumed from their own tokens with what is left.
        assert [len(c["prompts"]) for c in calls][:2] == [5, 3]
        assert [p["max_tokens"] for p in calls[1]["params"]] == [11, 10, 11]
        assert calls[1]["prompts"][0]["prompt_token_ids"][-1] == 1_000_000 + ord("\n")
        assert backend.last_stats["new_tokens"] == 6 + 10 + 3 + 12 + 12
    finally:
        backend.close()


def test_vllm_errors(fake_vllm, tiny_model, monkeypatch):
    with pytest.raises(UserError, match="not a multiple of --tensor_parallel_size 2"):
        make_backend("vllm", tiny_model, num_gpus=3, tensor_parallel_size=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError, match="--num_gpus 4 but only 2 GPU"):
        make_backend("vllm", tiny_model, num_gpus=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="vLLM needs 1 CUDA GPU"):
        make_backend("vllm", tiny_model)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("FAKE_VLLM_FAIL_INIT", "1")
    with pytest.raises(RuntimeError, match="fake init failure"):
        make_backend("vllm", tiny_model, num_gpus=2)  # in the workers
    assert all(not p.is_alive() for p in multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="fake init failure"):
        make_backend("vllm", tiny_model, num_gpus=1)  # in this process
