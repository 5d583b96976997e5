"""Text generation behind one interface: Hugging Face ``generate`` or vLLM.

Both backends take prompts that are already chat-templated strings, return
one completion per prompt in input order (special tokens stripped), and
record throughput in ``last_stats``.

    backend = make_backend(args.backend, args.model, num_gpus=args.num_gpus)
    try:
        outputs = backend.generate(prompts, max_new_tokens=100, temperature=0.0)
    finally:
        backend.close()

Sampling is seeded at the start of every ``generate`` call, so the same call
with the same seed gives the same outputs (callers resume in fixed chunks and
seed each chunk).

``stop_at_newline=True`` is an optimisation for answers that are scored on
the first line of the stripped output: a row may stop once a newline follows
some non-whitespace text. A leading newline never stops a row.

Heavy imports (torch, transformers, vllm) happen inside functions: the
data-parallel workers (``worker_pool.WorkerPool``, both backends) are spawned
processes that import this module and must set ``CUDA_VISIBLE_DEVICES`` before
anything touches CUDA. Being spawned, they also re-import the caller's main
module: scripts need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
import os
import sys
import time
import warnings

from .errors import UserError
from .models import load_tokenizer, resolve_model
from .prompting import require_chat_template
from .worker_pool import WorkerPool

BACKENDS = ("auto", "hf", "vllm")
_DTYPES = {
    "auto": "auto",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
# vLLM's stop string for stop_at_newline; see VLLMBackend._continue_after_leading_newlines.
_NEWLINE = "\n"
# HFBackend(compact_finished=True): a generate call ends, and its finished rows are dropped,
# once this fraction of its rows has finished.
_COMPACT_FRACTION = 0.25


# --------------------------------------------------------------------------- selection


def vllm_available() -> bool:
    """Whether ``import vllm`` would find a package (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_import_error() -> str | None:
    """None when ``import vllm`` works, else why not in one line. vLLM pins torch exactly, so an
    installed vLLM beside another torch is found by ``vllm_available`` but fails to import."""
    if not vllm_available():
        return "not installed"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # any failure of a broken install (ImportError, OSError of a .so, ...)
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
    return None


def resolve_backend_name(name: str) -> str:
    """``auto`` -> ``vllm`` when a CUDA GPU is visible and vLLM imports, else ``hf``."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (--backend); choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        if not (vllm_available() and _cuda_available()):
            return "hf"
        error = vllm_import_error()
        if error:
            print(f"note: --backend auto: vLLM is installed but does not import ({error}); using hf", file=sys.stderr)
        return "hf" if error else "vllm"
    if name == "vllm":
        error = vllm_import_error()
        if error == "not installed":
            raise UserError("vLLM requested (--backend vllm) but not installed; pip install vllm or use --backend hf")
        if error:
            raise UserError(f"vLLM requested (--backend vllm) but it does not import ({error}); see README, GPU users")
    return name


def vllm_version() -> str:
    """The version of the vLLM that ``import vllm`` finds (for an output's config)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def data_parallel_config(backend_name: str, num_gpus: int | None) -> dict:
    """For a resumable output's configuration: the hf backend's worker count when it splits calls.

    Sampled answers depend on it, and greedy ones on the batch shapes it gives (as on
    ``batch_size``); empty for one process, so one-process outputs written before it still match.
    """
    return {"hf_workers": num_gpus} if backend_name == "hf" and (num_gpus or 0) > 1 else {}


def _normalize_dtype(dtype: str) -> str:
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, bfloat16, float16, float32")
    return _DTYPES[key]


def check_precision(backend_name: str, dtype: str, tf32: bool) -> str:
    """The dtype normalised; ``tf32`` only for the hf backend with float32 weights (bf16 and fp16
    matrix multiplies already run on tensor cores; vLLM sets its own kernels)."""
    dtype = _normalize_dtype(dtype)
    if tf32 and backend_name != "hf":
        raise UserError("--tf32 is for the hf backend (--backend hf)")
    if tf32 and dtype != "float32":
        raise UserError(f"--tf32 changes float32 matrix multiplies only; pass --dtype float32 (got {dtype})")
    return dtype


def make_backend(
    name: str,
    model: str,
    *,
    num_gpus: int | None = None,
    batch_size: int = 16,
    max_model_len: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    tensor_parallel_size: int | None = None,
    need_chat_template: bool = False,
    compact_finished: bool = False,
    tf32: bool = False,
) -> "GenerationBackend":
    """Build a backend for ``model`` (anything ``resolve_model`` accepts).

    ``name``: ``hf``, ``vllm`` or ``auto`` (resolved with ``resolve_backend_name``).

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
    name = resolve_backend_name(name)
    dtype = check_precision(name, dtype, tf32)
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if max_model_len is not None and max_model_len < 1:
        raise UserError(f"--max_model_len must be at least 1, got {max_model_len}")
    path = resolve_model(model)
    if name == "hf":
        if (tensor_parallel_size or 1) > 1:
            raise UserError("the hf backend has no tensor parallelism; use --backend vllm to shard a model over GPUs")
        if (num_gpus or 0) > 1:  # data parallel: one model per GPU
            return HFDataParallelBackend(path, devices=_take_gpus(num_gpus, _visible_gpus()), batch_size=batch_size,
                                         max_model_len=max_model_len, dtype=dtype, tf32=tf32,
                                         need_chat_template=need_chat_template, compact_finished=compact_finished)
        device = "cpu" if num_gpus == 0 else None
        return HFBackend(path, batch_size=batch_size, max_model_len=max_model_len, dtype=dtype, device=device,
                         need_chat_template=need_chat_template, compact_finished=compact_finished, tf32=tf32)
    return VLLMBackend(
        path,
        num_gpus=num_gpus,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        dtype=dtype,
        seed=seed,
        need_chat_template=need_chat_template,
    )


def _load_tokenizer(path: str, need_chat_template: bool):
    tokenizer = load_tokenizer(path)
    if need_chat_template:
        require_chat_template(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------- interface


class GenerationBackend:
    """What the stage scripts use; see the module docstring."""

    name: str = ""
    tokenizer = None

    def __init__(self):
        self.last_stats: dict = {}
        self._encoded = None  # (prompts, token ids) of the last count_tokens call

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Prompt lengths in tokens (prompts are chat-templated already: no special tokens added)."""
        prompts = list(prompts)
        ids = self._token_ids(prompts)
        # Stages 1 and 4 count the prompts, then generate the same ones: keep the ids for that call.
        self._encoded = (prompts, ids)
        return [len(i) for i in ids]

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            return []
        if self._encoded is not None and self._encoded[0] == prompts:
            return self._encoded[1]
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_at_newline: bool = False,
        desc: str = "generating",
    ) -> list[str]:
        self._check_sampling(max_new_tokens, temperature, top_p)
        prompts = list(prompts)
        start = time.perf_counter()
        if not prompts:
            self._record(0, 0.0, 0)
            return []
        token_ids = self._token_ids(prompts)
        self._encoded = None
        texts, new_tokens, extra = self._generate_ids(
            token_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop_at_newline=stop_at_newline, desc=desc,
        )
        if len(texts) != len(prompts):  # callers zip answers with prompts; a short list would misalign them
            raise RuntimeError(f"{self.name} backend answered {len(texts)} of {len(prompts)} prompts")
        self._record(len(prompts), time.perf_counter() - start, new_tokens, **extra)
        return texts

    def _generate_ids(self, token_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                      seed: int, stop_at_newline: bool, desc: str) -> tuple[list[str], int, dict]:
        """(answers in input order, new tokens generated, extra stats) for tokenized prompts."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_sampling(self, max_new_tokens: int, temperature: float, top_p: float) -> None:
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")

    def _record(self, prompts: int, seconds: float, new_tokens: int, **extra) -> None:
        seconds = max(seconds, 1e-9)
        self.last_stats = {
            "prompts": prompts,
            "seconds": seconds,
            "prompts_per_s": prompts / seconds,
            "new_tokens": new_tokens,
            "new_tokens_per_s": new_tokens / seconds,
            **extra,
        }


# --------------------------------------------------------------------------- Hugging Face


def _check_model_len(token_ids: list[list[int]], max_model_len: int | None) -> None:
    """A prompt longer than ``max_model_len`` tokens is an error (numbered as the caller gave it)."""
    if max_model_len is None or not token_ids:
        return
    longest = max(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    if len(token_ids[longest]) > max_model_len:
        raise UserError(f"prompt {longest} has {len(token_ids[longest])} tokens, more than --max_model_len {max_model_len}")


def left_padded(token_ids: list[list[int]], pad_id: int, width: int, device):
    """(input_ids, attention_mask) of shape [rows, width] on ``device``, padded on the left so
    that every prompt ends at the same column (where generation continues)."""
    import torch

    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def newline_token_table(tokenizer, vocab_size: int | None = None):
    """Per-token flags for the newline stop, as three bool tensors of ``vocab_size``.

    ``has_newline``: the token's text contains "\\n"; ``content_before_newline``: it
    has non-whitespace text before its first "\\n"; ``has_content``: it has any
    non-whitespace text. Special tokens count as empty (they are stripped from outputs).
    """
    import torch

    size = max(vocab_size or 0, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    padding = [False] * (size - len(texts))  # ids the model has but the tokenizer never produces
    cuts = [text.find("\n") for text in texts]
    has_newline = torch.tensor([cut >= 0 for cut in cuts] + padding, dtype=torch.bool)
    content_before = torch.tensor(
        [cut > 0 and bool(text[:cut].strip()) for text, cut in zip(texts, cuts)] + padding, dtype=torch.bool
    )
    has_content = torch.tensor([bool(text.strip()) for text in texts] + padding, dtype=torch.bool)
    return has_newline, content_before, has_content


def newline_stopper(table, prompt_width: int, seen_content=None):
    """A StoppingCriteria for one ``generate`` call on left-padded prompts ``prompt_width`` wide.

    ``table`` is ``newline_token_table(...)`` (on the model's device). ``seen_content``
    (bool per row) carries the state of rows that already generated text in an earlier call.
    """
    return _newline_stopper_class()(table, prompt_width, seen_content)


@functools.lru_cache(maxsize=None)
def _newline_stopper_class():
    # Built lazily: the base class lives in transformers, which this module imports late.
    from transformers import StoppingCriteria

    class NewlineAfterContent(StoppingCriteria):
        """Stops a row once it has produced a newline after some non-whitespace text.

        Looks only at the newest token of each row (O(batch) per step, no host sync)
        and keeps per-row state; one instance per ``generate`` call. ``stop_step``
        holds, per row, the index of the generated token that stopped it (-1: none).
        """

        def __init__(self, table, prompt_width: int, seen_content=None):
            self.has_newline, self.content_before, self.has_content = table
            self.prompt_width = prompt_width
            self.seen_content = None if seen_content is None else seen_content.clone()
            self.stop_step = None

        def __call__(self, input_ids, scores=None, **kwargs):
            import torch

            last = input_ids[:, -1]
            if self.stop_step is None:
                batch = input_ids.shape[0]
                if self.seen_content is None:
                    self.seen_content = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
                self.stop_step = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
            newline = self.has_newline[last]
            done = newline & (self.seen_content | self.content_before[last])
            self.seen_content |= self.has_content[last]
            step = input_ids.shape[1] - self.prompt_width - 1
            self.stop_step = torch.where(done & (self.stop_step < 0), step, self.stop_step)
            return done

    return NewlineAfterContent


@functools.lru_cache(maxsize=None)
def _rows_finished_class():
    from transformers import StoppingCriteria

    newline_class = _newline_stopper_class()

    class RowsFinished(StoppingCriteria):
        """Per-row end of an answer (an EOS id, or with ``table`` the newline stop) for
        ``HFBackend(compact_finished=True)``.

        ``finish_step`` holds, per row, the index of the generated token that ended it (-1:
        running). Once ``fraction`` of the rows have ended, every row reports done, so
        ``generate`` returns and the caller can drop the finished rows. No host sync per step.
        """

        def __init__(self, table, prompt_width: int, eos, seen_content, fraction: float):
            self.newline = newline_class(table, prompt_width, seen_content) if table is not None else None
            self.prompt_width = prompt_width
            self.eos = eos
            self.fraction = fraction
            self.finish_step = None
            self.needed = None

        @property
        def seen_content(self):
            return None if self.newline is None else self.newline.seen_content

        def __call__(self, input_ids, scores=None, **kwargs):
            import torch

            done = torch.isin(input_ids[:, -1], self.eos)
            if self.newline is not None:
                done = done | self.newline(input_ids, scores)
            if self.finish_step is None:
                batch = input_ids.shape[0]
                self.finish_step = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
                self.needed = max(1, math.ceil(self.fraction * batch))
            step = input_ids.shape[1] - self.prompt_width - 1
            self.finish_step = torch.where(done & (self.finish_step < 0), step, self.finish_step)
            finished = self.finish_step >= 0
            return finished | (finished.sum() >= self.needed)

    return RowsFinished


@functools.lru_cache(maxsize=None)
def _cache_name() -> str:
    """The name of ``generate``'s KV-cache argument and output field: ``cache`` from transformers
    5.24 (``past_key_values`` warns there and goes in 6.0); 5.23 knows only ``past_key_values``."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {field.name for field in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return "cache" if "cache" in names else "past_key_values"


@contextlib.contextmanager
def _quiet_generation():
    """Silence transformers' advisory warnings about generation flags during our calls."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)


class HFBackend(GenerationBackend):
    """``AutoModelForCausalLM.generate`` in batches of prompts sorted longest first.

    Longest-first sorting keeps padding low and shows an out-of-memory at the
    first batch. Left padding, SDPA attention, bf16 on CUDA / fp32 on CPU for
    ``dtype="auto"``. The checkpoint's own generation_config is replaced by a
    neutral one (keeping its EOS ids), so only the arguments of ``generate``
    decide how text is sampled.

    ``compact_finished`` (greedy only; sampling is unaffected): plain ``generate`` computes
    every row of a batch until its slowest row ends, the finished rows producing padding;
    with it, a call ends once a quarter of its rows have finished (EOS or the newline stop),
    those rows are dropped, and ``generate`` continues the others from their KV cache
    (``_generate_compacting``). Each row gets the same inputs as in one uninterrupted call;
    only the batch shape changes, which on GPUs can change the kernels' rounding (as a
    different ``batch_size`` can).

    ``last_stats`` adds ``batches``, ``decode_steps`` (steps run, summed over batches),
    ``row_steps`` (rows x steps computed, finished rows included), ``prompt_tokens`` and
    ``padded_prompt_tokens``: ``new_tokens / row_steps`` is the useful share of decoding.
    """

    name = "hf"

    def __init__(self, path: str, *, batch_size: int = 16, max_model_len: int | None = None,
                 dtype: str = "auto", device: str | None = None, need_chat_template: bool = False,
                 compact_finished: bool = False, show_progress: bool = True, tf32: bool = False):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.batch_size = batch_size
        self.show_progress = show_progress
        self.max_model_len = max_model_len
        self.compact_finished = compact_finished
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        if tf32:  # make_backend's check_precision allows it with float32 weights only
            # process-wide, as the setting is: this process generates with this one model
            torch.backends.cuda.matmul.allow_tf32 = True
        self.tokenizer = _load_tokenizer(path, need_chat_template)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise UserError(f"{path}: tokenizer has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()

        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self._newline_table = None

    def _eos_ids(self) -> list[int]:
        # Chat models often end turns with a token other than the tokenizer's EOS
        # (Llama-3: <|eot_id|>); the checkpoint's generation_config lists them all.
        ids = []
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        ids.append(self.tokenizer.eos_token_id)
        unique = []
        for i in ids:
            if i is not None and i not in unique:
                unique.append(int(i))
        if not unique:
            raise UserError("the model defines no EOS token; cannot tell where an answer ends")
        return unique

    def _table(self):
        if self._newline_table is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._newline_table = tuple(t.to(self.device) for t in newline_token_table(self.tokenizer, vocab))
        return self._newline_table

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            bos_token_id=self.tokenizer.bos_token_id,
            num_beams=1,
            repetition_penalty=1.0,
        )
        if temperature == 0:
            return GenerationConfig(do_sample=False, **common)
        # top_k=0 disables HF's default top-k of 50, matching vLLM (no top-k).
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)

    def _generate_ids(self, token_ids, *, max_new_tokens, temperature, top_p, seed, stop_at_newline, desc):
        import torch

        from .progress import progress_bar

        _check_model_len(token_ids, self.max_model_len)
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        config = self._generation_config(max_new_tokens, temperature, top_p)

        outputs: list[str | None] = [None] * len(token_ids)
        new_tokens = 0
        totals = {"batches": 0, "decode_steps": 0, "row_steps": 0, "prompt_tokens": 0, "padded_prompt_tokens": 0}
        devices = [self.device] if self.device.type == "cuda" else []
        bar = progress_bar(total=len(token_ids), desc=desc, unit="prompt", dynamic_ncols=True, disable=not self.show_progress)
        try:
            # fork_rng: seeding must not disturb the caller's global RNG stream.
            with torch.random.fork_rng(devices=devices), torch.inference_mode(), _quiet_generation():
                torch.manual_seed(seed)
                for begin in range(0, len(order), self.batch_size):
                    rows = order[begin : begin + self.batch_size]
                    texts, count, batch_stats = self._generate_batch(
                        [token_ids[i] for i in rows], config, stop_at_newline
                    )
                    for i, text in zip(rows, texts):
                        outputs[i] = text
                    new_tokens += count
                    for key, value in batch_stats.items():
                        totals[key] += value
                    bar.update(len(rows))
        finally:
            bar.close()
        return outputs, new_tokens, totals

    def _generate_batch(self, batch_ids, config, stop_at_newline: bool):
        import torch

        width = max(len(ids) for ids in batch_ids)
        input_ids, attention = left_padded(batch_ids, self.pad_id, width, self.device)
        stats = {"batches": 1, "prompt_tokens": sum(len(ids) for ids in batch_ids),
                 "padded_prompt_tokens": input_ids.numel()}
        try:
            if self.compact_finished and not config.do_sample:
                answers, stats["decode_steps"], stats["row_steps"] = self._generate_compacting(
                    input_ids, attention, config, stop_at_newline
                )
            else:
                stopper = newline_stopper(self._table(), width) if stop_at_newline else None
                generated = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    generation_config=config,
                    stopping_criteria=_stopping_list(stopper),
                )
                new = generated[:, width:]
                lengths = self._valid_lengths(new, stopper)
                answers = [ids[:length] for ids, length in zip(new.tolist(), lengths)]
                stats["decode_steps"], stats["row_steps"] = new.shape[1], new.numel()
        except torch.OutOfMemoryError as err:
            raise UserError(
                f"out of memory generating {len(batch_ids)} prompts of up to {width} tokens; "
                f"lower --batch_size (now {self.batch_size})"
            ) from err
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return texts, sum(len(ids) for ids in answers), stats

    def _generate_compacting(self, input_ids, attention, config, stop_at_newline: bool):
        """Greedy generation of one batch that drops finished rows as it goes (see the class doc).

        Every call of ``generate`` after the first continues the remaining rows from the
        returned KV cache: their full token sequences and attention mask go in, the cache
        holds all but the last token, so ``generate`` feeds exactly the token an
        uninterrupted call would feed next. Returns (generated ids per row up to and
        including its EOS or newline stop, decode steps, rows x steps computed).
        """
        import torch
        from transformers import StoppingCriteriaList

        width = input_ids.shape[1]
        budget = config.max_new_tokens
        table = self._table() if stop_at_newline else None
        eos = torch.tensor(self.eos_ids, device=self.device)
        active = list(range(input_ids.shape[0]))  # original row of each row of the current batch
        answers = [None] * len(active)
        sequences, mask, cache, seen = input_ids, attention, None, None
        produced = row_steps = 0
        while True:
            stop = _rows_finished_class()(table, width, eos, seen, _COMPACT_FRACTION)
            segment = copy.deepcopy(config)
            segment.max_new_tokens = budget - produced
            segment.return_dict_in_generate = True
            out = self.model.generate(input_ids=sequences, attention_mask=mask, **{_cache_name(): cache},
                                      generation_config=segment, stopping_criteria=StoppingCriteriaList([stop]))
            steps = out.sequences.shape[1] - sequences.shape[1]
            produced += steps
            row_steps += steps * len(active)
            finish = stop.finish_step.tolist()
            generated = out.sequences[:, width:].tolist()
            keep = []
            for row, original in enumerate(active):
                if finish[row] >= 0:
                    answers[original] = generated[row][: finish[row] + 1]
                elif produced >= budget:
                    answers[original] = generated[row]
                else:
                    keep.append(row)
            if not keep:
                return answers, produced, row_steps
            index = torch.tensor(keep, device=self.device)
            sequences = out.sequences.index_select(0, index)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], steps))], dim=1).index_select(0, index)
            cache = getattr(out, _cache_name())
            cache.reorder_cache(index)  # the beam-search API: keeps the selected rows
            seen = None if stop.seen_content is None else stop.seen_content.index_select(0, index)
            active = [active[row] for row in keep]
            del out

    def _valid_lengths(self, new, stopper) -> list[int]:
        """Generated tokens per row up to and including its EOS or newline stop.

        Finished rows are filled with the pad token afterwards; cutting them here
        keeps a pad token that is not "special" out of the text.
        """
        import torch

        steps = new.shape[1]
        is_eos = torch.isin(new, torch.tensor(self.eos_ids, device=new.device))
        first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, steps)
        if stopper is not None and stopper.stop_step is not None:
            stop = torch.where(stopper.stop_step >= 0, stopper.stop_step + 1, steps)
            first_eos = torch.minimum(first_eos, stop)
        return first_eos.tolist()

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        self.model = None
        del model
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stopping_list(stopper):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([stopper]) if stopper is not None else None


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
        self.tokenizer = _load_tokenizer(path, need_chat_template)
        self.max_model_len = max_model_len
        common = {"batch_size": batch_size, "max_model_len": max_model_len, "dtype": dtype, "tf32": tf32,
                  "need_chat_template": need_chat_template, "compact_finished": compact_finished}
        # one progress bar (worker 0's) stands for all: the shares are equal
        build_args = [(path, dict(common, show_progress=rank == 0)) for rank in range(len(devices))]
        self._pool = WorkerPool(_hf_engine, _hf_serve, devices, build_args, name="hf")

    def _generate_ids(self, token_ids, *, max_new_tokens, temperature, top_p, seed, stop_at_newline, desc):
        if not len(self._pool):  # closed, by close() or by a worker's error
            raise RuntimeError("the hf data-parallel backend is closed")
        _check_model_len(token_ids, self.max_model_len)  # here: the prompt numbers are the caller's
        workers = len(self._pool)
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        shares = [order[rank::workers] for rank in range(workers)]
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stop_at_newline": stop_at_newline, "desc": f"{desc} (worker 0 of {workers})"}
        payloads = [([token_ids[i] for i in share], kwargs) if share else None for share in shares]
        answers = self._pool.run(payloads)  # on an error it stops the workers itself
        outputs: list[str | None] = [None] * len(token_ids)
        new_tokens, totals = 0, {}
        for share, answer in zip(shares, answers):
            if answer is None:
                continue
            texts, count, stats = answer
            for i, text in zip(share, texts):
                outputs[i] = text
            new_tokens += count
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        return outputs, new_tokens, totals

    def close(self) -> None:
        self._pool.close()  # a second close does nothing


# --------------------------------------------------------------------------- vLLM


def _visible_gpus() -> list[str]:
    """Device ids this process may use, as CUDA_VISIBLE_DEVICES entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _take_gpus(num_gpus: int, gpus: list[str]) -> list[str]:
    """The first ``num_gpus`` of the visible ``gpus``; too few is an error that says what is visible."""
    if len(gpus) < num_gpus:
        raise UserError(
            f"--num_gpus {num_gpus} but only {len(gpus)} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return gpus[:num_gpus]


def _context_window(path: str) -> int | None:
    """The model's ``max_position_embeddings``, if its config states one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "max_position_embeddings", None)
    return int(window) if window else None


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


def _request_seed(seed: int, index: int) -> int:
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


class VLLMBackend(GenerationBackend):
    """vLLM, tensor parallel and/or data parallel; see ``make_backend``."""

    name = "vllm"

    def __init__(self, path: str, *, num_gpus: int | None = None, tensor_parallel_size: int | None = None,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 worker_timeout_s: float | None = None, need_chat_template: bool = False):
        super().__init__()
        tp = tensor_parallel_size or 1
        if tp < 1:
            raise UserError(f"--tensor_parallel_size must be at least 1, got {tp}")
        gpus = _visible_gpus()
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
        self.tokenizer = _load_tokenizer(path, need_chat_template)
        llm_kwargs = {"tensor_parallel_size": tp, "dtype": dtype, "seed": seed}
        if max_model_len is not None:
            # vLLM refuses a max_model_len above the model's window; callers pass
            # "longest prompt + new tokens" limits that may exceed it.
            window = _context_window(path)
            llm_kwargs["max_model_len"] = min(max_model_len, window) if window else max_model_len
        self._llm = None
        self._pool = None
        if self.data_parallel_size == 1:
            from vllm import LLM

            self._llm = LLM(model=path, **llm_kwargs)
        else:
            gpus = _take_gpus(num_gpus, gpus)
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
                request["seed"] = _request_seed(seed, i)
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
        return texts, new_tokens, {}

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
            self._llm = None  # the only reference: vLLM's engine is freed by the collection below
            import gc

            gc.collect()
        if self._pool is not None:
            self._pool.close()


def _stopped_before_content(row: tuple) -> bool:
    text, _, finish_reason, stop_reason = row
    return finish_reason == "stop" and stop_reason == _NEWLINE and not text.strip()
