"""A backend from a ``BackendConfig`` (``build_backend``), or from the flags in one call (``make_backend``)."""

from __future__ import annotations

from ..errors import UserError
from ..models import resolve_model
from .backend_config import BackendConfig
from .base import GenerationBackend
from .hf import HFBackend
from .parallel import HFDataParallelBackend, take_gpus, visible_gpus
from .vllm_backend import VLLMBackend


def build_backend(config: BackendConfig, model: str, *, max_model_len: int | None = None, seed: int = 0,
                  need_chat_template: bool = False, compact_finished: bool = False) -> GenerationBackend:
    """Build the backend ``config`` names for ``model`` (anything ``resolve_model`` accepts).

    HF: one device (the first CUDA GPU, else the CPU; ``num_gpus=0``: the CPU);
    ``batch_size`` prompts per ``generate`` call. ``num_gpus`` > 1: data parallel,
    one model per GPU in spawned workers (``HFDataParallelBackend``); no tensor
    parallelism.

    vLLM: ``num_gpus`` GPUs in all (default: every visible GPU), split into
    ``num_gpus / tensor_parallel_size`` data-parallel replicas of
    ``tensor_parallel_size`` GPUs each (default 1: pure data parallel, the
    fastest choice when the model fits on one GPU). One replica runs in this
    process; several run as spawned worker processes, one per GPU group, each
    given a contiguous shard of the prompts. Examples: ``num_gpus=8`` -> 8
    workers of 1 GPU; ``num_gpus=8, tensor_parallel_size=8`` -> one engine
    sharded over 8 GPUs (the reference setup); ``num_gpus=8,
    tensor_parallel_size=2`` -> 4 workers of 2 GPUs. ``max_model_len`` is
    lowered to the model's ``max_position_embeddings`` when above it (vLLM
    would refuse it); the hf backend only checks prompts against it. ``batch_size`` is unused
    (vLLM schedules its own batches). ``seed`` seeds the vLLM engine (the hf
    backend has nothing to seed at load); sampling is seeded per call by
    ``generate(seed=...)``. ``need_chat_template``: a tokenizer without one is an
    error before any weights are loaded. ``compact_finished``: hf only, see ``HFBackend``
    (vLLM schedules rows itself). ``tf32``: hf only, with ``dtype="float32"``: float32 matrix
    multiplies on CUDA run on TF32 tensor cores.
    """
    if max_model_len is not None and max_model_len < 1:
        raise UserError(f"--max_model_len must be at least 1, got {max_model_len}")
    path = resolve_model(model)
    num_gpus = config.num_gpus
    if config.backend == "hf":
        common = {"batch_size": config.batch_size, "max_model_len": max_model_len, "dtype": config.dtype,
                  "tf32": config.tf32, "need_chat_template": need_chat_template, "compact_finished": compact_finished}
        if (num_gpus or 0) > 1:  # data parallel: one model per GPU
            return HFDataParallelBackend(path, devices=take_gpus(num_gpus, visible_gpus()), **common)
        return HFBackend(path, device="cpu" if num_gpus == 0 else None, **common)
    return VLLMBackend(path, num_gpus=num_gpus, tensor_parallel_size=config.tensor_parallel_size,
                       max_model_len=max_model_len, dtype=config.dtype, seed=seed,
                       need_chat_template=need_chat_template)


def make_backend(name: str, model: str, *, num_gpus: int | None = None, batch_size: int = 16,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 tensor_parallel_size: int | None = None, need_chat_template: bool = False,
                 compact_finished: bool = False, tf32: bool = False) -> GenerationBackend:
    """``build_backend`` of ``BackendConfig.resolve(name, ...)``: ``name`` is ``hf``, ``vllm`` or ``auto``."""
    config = BackendConfig.resolve(name, dtype=dtype, tf32=tf32, num_gpus=num_gpus,
                                   tensor_parallel_size=tensor_parallel_size, batch_size=batch_size)
    return build_backend(config, model, max_model_len=max_model_len, seed=seed,
                         need_chat_template=need_chat_template, compact_finished=compact_finished)
