"""Data parallel generation: GPU selection, and one ``HFBackend`` per GPU in spawned workers."""

from __future__ import annotations

import os

from ..errors import UserError
from ..worker_pool import WorkerPool
from .base import GenerationBackend, check_model_len, load_backend_tokenizer
from .hf import HFBackend


def visible_gpus() -> list[str]:
    """Device ids this process may use, as CUDA_VISIBLE_DEVICES entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def take_gpus(num_gpus: int, gpus: list[str]) -> list[str]:
    """The first ``num_gpus`` of the visible ``gpus``; too few is an error that says what is visible."""
    if len(gpus) < num_gpus:
        raise UserError(
            f"--num_gpus {num_gpus} but only {len(gpus)} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return gpus[:num_gpus]


def _hf_engine(path: str, kwargs: dict) -> HFBackend:
    """A data-parallel worker's HFBackend (WorkerPool ``build``), on the one GPU it sees."""
    return HFBackend(path, **kwargs)


def _hf_serve(backend: HFBackend, payload: tuple) -> tuple:
    """WorkerPool ``serve``: ``payload`` = (token ids, keyword arguments of ``_generate_ids``)."""
    token_ids, kwargs = payload
    return backend._generate_ids(token_ids, **kwargs)


class HFDataParallelBackend(GenerationBackend):
    """One ``HFBackend`` per GPU, each in a spawned worker; a call's prompts are split among them.

    The prompts are sorted by length and dealt out in turn, so every worker gets the same mix
    of long and short prompts (and about the same work); each worker then batches its share
    longest first, as ``HFBackend`` does. Greedy answers are the one-process answers up to the
    rounding of other batch shapes (bf16 on GPUs), as with another ``batch_size``; sampled
    answers depend on the number of workers (each seeds its share with the call's seed).
    ``devices``: one CUDA_VISIBLE_DEVICES value per worker ("" runs a worker on the CPU).
    """

    name = "hf"

    def __init__(self, path: str, *, devices: list[str], batch_size: int = 16, max_model_len: int | None = None,
                 dtype: str = "auto", need_chat_template: bool = False, compact_finished: bool = False,
                 tf32: bool = False):
        super().__init__()
        self.tokenizer = load_backend_tokenizer(path, need_chat_template)
        self.max_model_len = max_model_len
        common = {"batch_size": batch_size, "max_model_len": max_model_len, "dtype": dtype, "tf32": tf32,
                  "need_chat_template": need_chat_template, "compact_finished": compact_finished}
        # one progress bar (worker 0's) stands for all: the shares are equal
        build_args = [(path, dict(common, show_progress=rank == 0)) for rank in range(len(devices))]
        self._pool = WorkerPool(_hf_engine, _hf_serve, devices, build_args, name="hf")

    def _generate_ids(self, token_ids, *, max_new_tokens, temperature, top_p, seed, stop_at_newline, desc):
        if not len(self._pool):  # closed, by close() or by a worker's error
            raise RuntimeError("the hf data-parallel backend is closed")
        check_model_len(token_ids, self.max_model_len)  # here: the prompt numbers are the caller's
        workers = len(self._pool)
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        shares = [order[rank::workers] for rank in range(workers)]
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stop_at_newline": stop_at_newline, "desc": f"{desc} (worker 0 of {workers})"}
        payloads = [([token_ids[i] for i in share], kwargs) if share else None for share in shares]
        answers = self._pool.run(payloads)  # on an error it stops the workers itself
        outputs: list[str | None] = [None] * len(token_ids)
        new_tokens = 0
        for share, answer in zip(shares, answers):
            if answer is None:
                continue
            texts, count = answer
            for i, text in zip(share, texts):
                outputs[i] = text
            new_tokens += count
        return outputs, new_tokens

    def close(self) -> None:
        self._pool.close()  # a second close does nothing
