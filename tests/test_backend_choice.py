"""Which generation backend runs: ``auto``/``hf``/``vllm`` resolution, bad options, precision
flags, and the hf backend data parallel over processes."""

import multiprocessing

import pytest
import torch

from conftest import FAKE_VLLM
from pos2distill.errors import UserError
from pos2distill.generation import backend_config
from pos2distill.generation.backend_config import check_precision, resolve_backend_name, vllm_available
from pos2distill.generation.factory import make_backend
from pos2distill.generation.parallel import HFDataParallelBackend


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_resolve_backend_name(monkeypatch):
    with pytest.raises(UserError, match="unknown backend 'tensorrt'"):
        resolve_backend_name("tensorrt")
    assert resolve_backend_name("hf") == "hf"

    monkeypatch.setattr(backend_config, "vllm_available", lambda: False)
    with pytest.raises(UserError) as err:
        resolve_backend_name("vllm")
    assert str(err.value) == (
        "vLLM requested (--backend vllm) but not installed; pip install vllm or use --backend hf"
    )
    monkeypatch.setattr(backend_config, "_cuda_available", lambda: True)
    assert resolve_backend_name("auto") == "hf"  # no vllm

    monkeypatch.setattr(backend_config, "vllm_available", lambda: True)
    monkeypatch.setattr(backend_config, "vllm_import_error", lambda: None)
    assert resolve_backend_name("auto") == "vllm"
    assert resolve_backend_name("vllm") == "vllm"
    monkeypatch.setattr(backend_config, "_cuda_available", lambda: False)
    assert resolve_backend_name("auto") == "hf"  # no GPU


def test_vllm_available_finds_the_stand_in(monkeypatch):
    monkeypatch.syspath_prepend(FAKE_VLLM)
    assert vllm_available()


def test_make_backend_rejects_bad_options(tiny_model, monkeypatch):
    with pytest.raises(UserError, match="unknown dtype"):
        make_backend("hf", tiny_model, dtype="int3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="--num_gpus 2 but only 0 GPU"):
        make_backend("hf", tiny_model, num_gpus=2)
    with pytest.raises(UserError, match="no tensor parallelism"):
        make_backend("hf", tiny_model, tensor_parallel_size=2)
    with pytest.raises(UserError, match="batch_size"):
        make_backend("hf", tiny_model, batch_size=0)
    with pytest.raises(UserError, match="unknown backend"):
        make_backend("onnx", tiny_model)
    with pytest.raises(UserError, match="pass --dtype float32"):
        make_backend("hf", tiny_model, dtype="bfloat16", tf32=True)


def test_tf32_turns_on_tensor_cores_for_float32_matmuls(tiny_model):
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        backend = make_backend("hf", tiny_model, num_gpus=0, dtype="float32", tf32=True)
        assert backend.model.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        backend.close()
    finally:  # a process-wide setting: leave it as found
        torch.backends.cuda.matmul.allow_tf32 = before
    with pytest.raises(UserError, match="--tf32 is for the hf backend"):
        check_precision("vllm", "float32", True)
    assert check_precision("hf", "fp32", True) == "float32"


def test_auto_falls_back_to_hf(tiny_model, monkeypatch):
    monkeypatch.setattr(backend_config, "vllm_available", lambda: False)
    backend = make_backend("auto", tiny_model, num_gpus=0)
    try:
        assert backend.name == "hf" and backend.device.type == "cpu"
    finally:
        backend.close()


def test_hf_data_parallel_matches_one_process(tiny_model, monkeypatch):
    """num_gpus=2 with the hf backend: two worker processes, the same greedy answers in input order."""
    prompts = [f"question {i}: " + "word " * (i % 5) for i in range(11)]
    single = make_backend("hf", tiny_model, batch_size=3, num_gpus=0, max_model_len=40)
    try:
        expected = single.generate(prompts, max_new_tokens=6)
        expected_stats = dict(single.last_stats)
    finally:
        single.close()
    assert not torch.cuda.is_available()  # the two "GPUs" below are CPU workers on this machine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    backend = make_backend("hf", tiny_model, batch_size=3, num_gpus=2, max_model_len=40)
    try:
        assert isinstance(backend, HFDataParallelBackend) and backend._pool.devices == ["0", "1"]
        assert backend.generate(prompts, max_new_tokens=6) == expected
        stats = backend.last_stats
        # shares of 6 and 5 prompts, every row counted once
        assert stats["prompts"] == 11 and stats["new_tokens"] == expected_stats["new_tokens"]
        assert backend.generate(prompts[:1], max_new_tokens=6) == expected[:1]  # one worker sits it out
        # too long a prompt: a one-line error before any worker is asked, numbered as given
        with pytest.raises(UserError, match="prompt 1 has .* tokens, more than --max_model_len 40"):
            backend.generate(["short", "word " * 60], max_new_tokens=2)
        assert backend.generate(prompts[:2], max_new_tokens=6) == expected[:2]  # still usable
    finally:
        backend.close()
    assert all(not p.is_alive() for p in multiprocessing.active_children())
