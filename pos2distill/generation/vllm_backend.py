"""The vLLM backend: tensor parallel and/or data parallel (one engine per GPU group)."""

from __future__ import annotations

import os

from ..errors import UserError
from ..worker_pool import WorkerPool
from .base import GenerationBackend, load_backend_tokenizer
from .parallel import take_gpus, visible_gpus

# The stop string for stop_at_newline; see VLLMBackend._continue_after_leading_newlines.
_NEWLINE = "\n"

# The vLLM API this backend uses, in one place: tests/test_vllm_api.py checks every name against
# a description recorded from a vLLM release (scripts/record_vllm_api.py -> tests/data/), and
# checks that the calls below pass nothing else (through tests/fake_vllm).
VLLM_API = {
    "imports": ("LLM", "SamplingParams"),
    "LLM": ("model", "tensor_parallel_size", "dtype", "seed", "max_model_len"),  # keyword arguments
    "LLM.generate": {"positional": ("prompts", "sampling_params"), "keyword": ("use_tqdm",)},
    "SamplingParams": ("temperature", "top_p", "max_tokens", "seed", "stop", "include_stop_str_in_output"),
    "TokensPrompt": ("prompt_token_ids",),  # the prompt dicts' keys
    "RequestOutput": ("outputs",),
    "CompletionOutput": ("text", "token_ids", "finish_reason", "stop_reason"),
}


def _context_window(path: str) -> int | None:
    """The model's ``max_position_embeddings``, if its config states one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "max_position_embeddings", None)
    return int(window) if window else None


def request_seed(seed: int, index: int) -> int:
    # One seed per prompt, from the call's seed and the prompt's index in the call,
    # so outputs do not depend on how prompts are sharded over workers.
    return (seed * 1_000_003 + index) % (2**31 - 1)


def _run_vllm(llm, prompt_ids: list[list[int]], requests: list[dict], use_tqdm: bool) -> list[tuple]:
    """``LLM.generate`` on token-id prompts with one SamplingParams per prompt.

    Returns plain picklable tuples ``(text, token_ids, finish_reason, stop_reason)``.
    """
    from vllm import SamplingParams

    # Token ids, not strings: vLLM would tokenize a string with special tokens
    # added, doubling the BOS that the chat template already wrote.
    prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
    params = [SamplingParams(**request) for request in requests]
    # No llm.reset_prefix_cache() here (it would keep the probe's cached prefixes out of stage 1).
    # It was dropped after a stalled H200 run, which the logs later showed had stalled in the
    # engine's first start-up compile, before any generate (docs/performance.md); it stays out
    # until a run measures what it changes.
    results = llm.generate(prompts, params, use_tqdm=use_tqdm)
    rows = []
    for result in results:
        out = result.outputs[0]
        rows.append((out.text, list(out.token_ids or ()), out.finish_reason, out.stop_reason))
    return rows


def _vllm_engine(model: str, llm_kwargs: dict):
    """A data-parallel worker's engine (WorkerPool ``build``)."""
    from vllm import LLM

    return LLM(model=model, **llm_kwargs)


def _vllm_serve(llm, payload: tuple) -> list[tuple]:
    """WorkerPool ``serve``: ``payload`` = (prompt ids, requests, use_tqdm)."""
    return _run_vllm(llm, *payload)


def _shards(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, end) ranges covering n items, sizes differing by at most 1."""
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _stopped_before_content(row: tuple) -> bool:
    text, _, finish_reason, stop_reason = row
    return finish_reason == "stop" and stop_reason == _NEWLINE and not text.strip()


class VLLMBackend(GenerationBackend):
    """vLLM, tensor parallel and/or data parallel; see ``factory.build_backend``."""

    name = "vllm"

    def __init__(self, path: str, *, num_gpus: int | None = None, tensor_parallel_size: int | None = None,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 worker_timeout_s: float | None = None, need_chat_template: bool = False):
        super().__init__()
        tp = tensor_parallel_size or 1
        if tp < 1:
            raise UserError(f"--tensor_parallel_size must be at least 1, got {tp}")
        gpus = visible_gpus()
        if num_gpus is None:  # every visible GPU that fits into whole replicas
            num_gpus = len(gpus) // tp * tp
            if num_gpus == 0:
                raise UserError(
                    f"vLLM needs {tp} CUDA GPU(s); {len(gpus)} visible (use --backend hf or set --num_gpus)"
                )
        if num_gpus < 1:
            raise UserError(f"--num_gpus must be at least 1, got {num_gpus}")
        if num_gpus % tp:
            raise UserError(
                f"--num_gpus {num_gpus} is not a multiple of --tensor_parallel_size {tp}"
            )
        self.tensor_parallel_size = tp
        self.data_parallel_size = num_gpus // tp
        self.model_path = path
        self.tokenizer = load_backend_tokenizer(path, need_chat_template)
        llm_kwargs = {"tensor_parallel_size": tp, "dtype": dtype, "seed": seed}
        if max_model_len is not None:
            # vLLM refuses a max_model_len above the model's window; callers pass
            # "longest prompt + new tokens" limits that may exceed it.
            window = _context_window(path)
            llm_kwargs["max_model_len"] = min(max_model_len, window) if window else max_model_len
        self._llm = None
        self._pool = None
        # vLLM schedules deterministically only with its engine in this process (vLLM's
        # "Reproducibility" page); a user's own setting wins. Data-parallel workers inherit it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.data_parallel_size == 1:
            from vllm import LLM

            self._llm = LLM(model=path, **llm_kwargs)
        else:
            gpus = take_gpus(num_gpus, gpus)
            groups = [",".join(gpus[rank * tp : (rank + 1) * tp]) for rank in range(self.data_parallel_size)]
            self._pool = WorkerPool(_vllm_engine, _vllm_serve, groups, [(path, llm_kwargs)] * len(groups),
                                    name="vLLM", timeout_s=worker_timeout_s)

    def _requests(self, n_prompts, *, max_tokens, temperature, top_p, seed, stop_at_newline):
        sampling = temperature > 0
        requests = []
        for i in range(n_prompts):
            request = {"temperature": float(temperature), "top_p": float(top_p) if sampling else 1.0,
                       "max_tokens": int(max_tokens)}
            if sampling:
                request["seed"] = request_seed(seed, i)
            if stop_at_newline:
                # Keep the newline in the text, as the hf backend does.
                request["stop"] = [_NEWLINE]
                request["include_stop_str_in_output"] = True
            requests.append(request)
        return requests

    def _generate_raw(self, prompts: list[list[int]], requests: list[dict]) -> list[tuple]:
        if self._llm is not None:
            return _run_vllm(self._llm, prompts, requests, True)
        if self._pool is None or not len(self._pool):  # closed, by close() or by a worker's error
            raise RuntimeError("the vLLM backend is closed")
        # Contiguous shards of equal size: one progress bar (worker 0's) stands for all.
        payloads = [(prompts[start:end], requests[start:end], rank == 0) if end > start else None
                    for rank, (start, end) in enumerate(_shards(len(prompts), len(self._pool)))]
        answers = self._pool.run(payloads)  # on an error it stops the workers itself
        return [row for rows in answers if rows is not None for row in rows]

    def _generate_ids(self, prompt_ids, *, max_new_tokens, temperature, top_p, seed, stop_at_newline, desc):
        requests = self._requests(len(prompt_ids), max_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed, stop_at_newline=stop_at_newline)
        rows = self._generate_raw(prompt_ids, requests)
        texts = [row[0] for row in rows]
        new_tokens = sum(len(row[1]) for row in rows)
        if stop_at_newline:
            new_tokens += self._continue_after_leading_newlines(prompt_ids, requests, rows, texts)
        return texts, new_tokens

    def _continue_after_leading_newlines(self, prompt_ids, requests, rows, texts) -> int:
        """vLLM's stop string also fires on a leading newline; resume those rows.

        A row that stopped on "\\n" before any non-whitespace text is continued
        from its prompt + generated tokens (exactly the tokens it produced, no
        re-tokenization) with the tokens it has left, until it produces content,
        ends, or runs out of tokens. Returns the extra tokens generated.
        """
        extra = 0
        generated = [list(row[1]) for row in rows]
        pending = [i for i, row in enumerate(rows) if _stopped_before_content(row)]
        while True:
            pending = [i for i in pending if len(generated[i]) < requests[i]["max_tokens"]]
            if not pending:
                return extra
            batch = [dict(requests[i], max_tokens=requests[i]["max_tokens"] - len(generated[i])) for i in pending]
            again = self._generate_raw([list(prompt_ids[i]) + generated[i] for i in pending], batch)
            for i, row in zip(pending, again):
                texts[i] += row[0]
                generated[i] += row[1]
                extra += len(row[1])
            pending = [i for i, row in zip(pending, again) if _stopped_before_content(row)]

    def close(self) -> None:
        if self._llm is not None:
            self._llm = None  # the last reference: the engine goes with the collection below
            import gc

            gc.collect()
        if self._pool is not None:
            self._pool.close()
