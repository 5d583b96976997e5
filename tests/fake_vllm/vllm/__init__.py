"""A stand-in for the ``vllm`` package, for tests on machines without GPUs.

It mirrors the documented offline interface that pos2distill uses: ``LLM``,
``LLM.generate``, ``SamplingParams``, ``RequestOutput`` and ``CompletionOutput``.
Unknown keyword arguments raise ``TypeError`` as they would with the real one. Its names,
signatures and defaults are a subset of vLLM 0.26.0's (tests/data/vllm_api_0.26.0.json;
tests/test_vllm_api.py checks it).

Every ``LLM(...)`` and ``LLM.generate(...)`` call is appended as one JSON line
to ``$FAKE_VLLM_LOG`` (with the process id, ``CUDA_VISIBLE_DEVICES`` and
``VLLM_ENABLE_V1_MULTIPROCESSING``), so a
test can check what reached vLLM, including from spawned worker processes.

The "model" generates characters, one token each, with token id
``CHAR_BASE + ord(char)``. Prompts are token-id dicts (``{"prompt_token_ids": [...]}``)
or strings. Its completion for a prompt is ``$FAKE_VLLM_SCRIPT`` (a JSON file
mapping ``prompt_key(ids)`` to a completion) or else ``default_completion(ids)``;
generated-character ids at the end of a prompt continue that completion.
A completion that ends before ``max_tokens`` ends with ``EOS_ID``.
``$FAKE_VLLM_FAIL_INIT`` makes ``LLM(...)`` raise.
"""

import dataclasses
import json
import os

__version__ = "0.26.0+fake"
CHAR_BASE = 1_000_000
EOS_ID = 999_999

_LLM_ARGS = {
    "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size",
    "dtype", "quantization", "revision", "tokenizer_revision", "seed", "gpu_memory_utilization",
    "cpu_offload_gb", "enforce_eager", "max_model_len", "max_num_seqs",
    "disable_custom_all_reduce", "pipeline_parallel_size", "enable_prefix_caching",
}
_SAMPLING_DEFAULTS = {
    "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None,
    "stop_token_ids": None, "ignore_eos": False, "max_tokens": 16, "min_tokens": 0,
    "logprobs": None, "skip_special_tokens": True, "include_stop_str_in_output": False,
}


def _log(event: dict) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if not path:
        return
    event = dict(event, pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                 v1_multiprocessing=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def prompt_key(ids) -> str:
    return " ".join(str(i) for i in ids)


def default_completion(ids) -> str:
    """What the fake model says to a prompt with no scripted completion."""
    return f"answer {len(ids)}:{sum(ids) % 100003}"


class SamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(_SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.given = sorted(kwargs)  # what the caller passed, for the log
        for name, default in _SAMPLING_DEFAULTS.items():
            setattr(self, name, kwargs.get(name, default))
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in _SAMPLING_DEFAULTS}


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    routed_experts: object = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished


def _script() -> dict:
    path = os.environ.get("FAKE_VLLM_SCRIPT")
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _complete(prompt, params: SamplingParams, script: dict) -> CompletionOutput:
    if isinstance(prompt, dict):
        ids = list(prompt["prompt_token_ids"])
    else:
        ids = [CHAR_BASE - 1]  # strings are not tokenized by the fake
    cut = len(ids)
    while cut > 0 and ids[cut - 1] >= CHAR_BASE:
        cut -= 1
    already = "".join(chr(i - CHAR_BASE) for i in ids[cut:])
    base = ids[:cut]
    full = script.get(prompt_key(base), default_completion(base))
    if not full.startswith(already):
        raise AssertionError(f"continuation {already!r} does not follow the completion {full!r}")
    rest = full[len(already):]
    # Stop strings are checked after every token, as vLLM does.
    for n in range(1, min(len(rest), params.max_tokens) + 1):
        text = rest[:n]
        for stop in params.stop or ():
            if text.endswith(stop):
                shown = text if params.include_stop_str_in_output else text[: -len(stop)]
                tokens = [CHAR_BASE + ord(c) for c in text]
                return CompletionOutput(0, shown, tokens, None, None, finish_reason="stop", stop_reason=stop)
    if len(rest) >= params.max_tokens:
        text = rest[: params.max_tokens]
        return CompletionOutput(0, text, [CHAR_BASE + ord(c) for c in text], None, None, finish_reason="length")
    return CompletionOutput(0, rest, [CHAR_BASE + ord(c) for c in rest] + [EOS_ID], None, None, finish_reason="stop")


class LLM:
    def __init__(self, model: str, **kwargs):
        unknown = set(kwargs) - _LLM_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        if os.environ.get("FAKE_VLLM_FAIL_INIT"):
            raise RuntimeError("fake init failure")
        self.model = model
        self.kwargs = kwargs
        _log({"event": "init", "model": model, "kwargs": kwargs})

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
        _log({
            "event": "generate",
            "prompts": prompts,
            "params": [p.as_dict() for p in params],
            "given": sorted({name for p in params for name in p.given}),
            "use_tqdm": use_tqdm,
        })
        script = _script()
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
            text = prompt if isinstance(prompt, str) else None
            outputs.append(RequestOutput(str(i), text, ids, None, [_complete(prompt, p, script)], True))
        return outputs
