"""vLLM API drift: what the vLLM backend uses, and the stand-in in tests/fake_vllm, against a
description recorded from the vLLM 0.26.0 wheel itself (scripts/record_vllm_api.py).

The backend's uses are listed once, in ``pos2distill.generation.vllm_backend.VLLM_API``; a test here checks
that the backend passes and reads nothing else (through the stand-in, which logs every call).
"""

import ast
import dataclasses
import inspect
import json
import os

import pytest

from pos2distill.generation.backend_config import vllm_version
from pos2distill.generation.factory import make_backend
from pos2distill.generation.vllm_backend import VLLM_API

RECORDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vllm_api_0.26.0.json")


@pytest.fixture(scope="module")
def api():
    with open(RECORDED, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- comparisons


def _method(api, cls, name="__init__") -> list[dict]:
    return api["classes"][cls]["methods"].get(name, [])


def _field_names(api, cls) -> set:
    return {f["name"] for f in api["classes"][cls]["fields"]}


def llm_keywords(api) -> set:
    """Keyword arguments ``LLM(...)`` takes: its own, and EngineArgs' fields through ``**kwargs``."""
    params = _method(api, "LLM")
    names = {p["name"] for p in params if p["kind"] not in ("var_positional", "var_keyword", "positional_only")}
    if any(p["kind"] == "var_keyword" for p in params):
        names |= _field_names(api, "EngineArgs")
    return names - {"self"}


def api_use_problems(used: dict, api: dict) -> list[str]:
    """What ``used`` (shaped as ``VLLM_API``) names that the recorded vLLM lacks."""
    problems = [f"vllm.{name} is not exported" for name in used["imports"] if name not in api["exported"]]
    problems += [f"LLM(...) takes no keyword {k!r}" for k in used["LLM"] if k not in llm_keywords(api)]
    generate = _method(api, "LLM", "generate")
    positional = [p["name"] for p in generate if p["kind"] in ("positional_only", "positional_or_keyword")][1:]
    if list(used["LLM.generate"]["positional"]) != positional[: len(used["LLM.generate"]["positional"])]:
        problems.append(f"LLM.generate's positional parameters are {positional}")
    keywords = {p["name"] for p in generate if p["kind"] in ("positional_or_keyword", "keyword_only")}
    problems += [f"LLM.generate takes no keyword {k!r}" for k in used["LLM.generate"]["keyword"] if k not in keywords]
    for cls in ("SamplingParams", "TokensPrompt", "CompletionOutput"):
        problems += [f"{cls} has no field {f!r}" for f in used[cls] if f not in _field_names(api, cls)]
    attributes = set(api["classes"]["RequestOutput"]["attributes"])
    problems += [f"RequestOutput has no attribute {a!r}" for a in used["RequestOutput"] if a not in attributes]
    return problems


def _described(param: inspect.Parameter) -> dict:
    kind = {inspect.Parameter.POSITIONAL_ONLY: "positional_only", inspect.Parameter.POSITIONAL_OR_KEYWORD:
            "positional_or_keyword", inspect.Parameter.VAR_POSITIONAL: "var_positional",
            inspect.Parameter.KEYWORD_ONLY: "keyword_only", inspect.Parameter.VAR_KEYWORD: "var_keyword"}[param.kind]
    return {"name": param.name, "kind": kind, "has_default": param.default is not inspect.Parameter.empty}


def signature_problems(where: str, fake, recorded: list[dict]) -> list[str]:
    """The fake's signature must be a part of the recorded one: the same names, kinds, defaults
    present or not, and each positional parameter at the same place."""
    real = {p["name"]: p for p in recorded}
    real_positional = [p["name"] for p in recorded if p["kind"] in ("positional_only", "positional_or_keyword")]
    problems, place = [], 0
    for param in inspect.signature(fake).parameters.values():
        mine = _described(param)
        theirs = real.get(param.name)
        if mine["kind"] == "var_keyword":
            theirs = next((p for p in recorded if p["kind"] == "var_keyword"), None)
            if theirs is None:
                problems.append(f"{where}: **{param.name} but vLLM takes no **kwargs")
            continue
        if theirs is None:
            problems.append(f"{where}: vLLM has no parameter {param.name!r}")
            continue
        if (mine["kind"], mine["has_default"]) != (theirs["kind"], theirs["has_default"]):
            problems.append(f"{where}: {param.name!r} is {mine} in the fake, {theirs} in vLLM")
        if mine["kind"] in ("positional_only", "positional_or_keyword"):
            if real_positional[place: place + 1] != [param.name]:
                problems.append(f"{where}: {param.name!r} is positional parameter {place} in the fake, not in vLLM")
            place += 1
    return problems


def _as_init(fields: list[dict]) -> list[dict]:
    return [{"name": "self", "kind": "positional_or_keyword", "has_default": False}] + [
        dict(f, kind="positional_or_keyword") for f in fields]


# --------------------------------------------------------------------------- tests


def test_the_description_is_vllm_0_26_0(api):
    assert api["version"] == "0.26.0" and api["requires"]["torch"] == "==2.11.0"
    assert {"LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TokensPrompt"} <= set(api["exported"])
    # a real reading, not an empty one: vLLM's well-known names are there
    assert {"temperature", "top_p", "max_tokens", "seed", "stop"} <= _field_names(api, "SamplingParams")
    assert "max_model_len" in _field_names(api, "EngineArgs") and "max_model_len" not in {
        p["name"] for p in _method(api, "LLM")}


def test_the_backend_uses_only_what_vllm_0_26_0_has(api):
    assert api_use_problems(VLLM_API, api) == []


@pytest.mark.parametrize("part, name", [
    ("SamplingParams", "best_of"),       # not a field of 0.26.0
    ("LLM", "swap_space"),               # neither an LLM nor an EngineArgs argument in 0.26.0
    ("CompletionOutput", "logprob"),
    ("TokensPrompt", "prompt_ids"),
    ("RequestOutput", "output"),
    ("imports", "LLMEngineV2"),
])
def test_the_comparison_notices_a_name_vllm_lacks(api, part, name):
    used = dict(VLLM_API, **{part: tuple(VLLM_API[part]) + (name,)})
    assert any(repr(name) in p or name in p for p in api_use_problems(used, api))


def test_the_comparison_notices_generate_arguments_moved(api):
    moved = dict(VLLM_API, **{"LLM.generate": {"positional": ("prompts", "use_tqdm"), "keyword": ("lora",)}})
    problems = api_use_problems(moved, api)
    assert any(p.startswith("LLM.generate's positional parameters are") for p in problems)
    assert "LLM.generate takes no keyword 'lora'" in problems


def test_the_backend_passes_and_reads_only_what_it_lists(fake_vllm, tiny_model, monkeypatch):
    """Through the stand-in: every keyword the backend passed, prompt key and output attribute read."""
    import vllm

    reads = set()

    def watched(cls):
        class Watched(cls):
            def __getattribute__(self, name):
                if not name.startswith("__"):
                    reads.add((cls.__name__, name))
                return super().__getattribute__(name)
        return Watched

    monkeypatch.setattr(vllm, "CompletionOutput", watched(vllm.CompletionOutput))
    monkeypatch.setattr(vllm, "RequestOutput", watched(vllm.RequestOutput))
    with make_backend("vllm", tiny_model, num_gpus=1, seed=3, max_model_len=4096, dtype="bf16") as backend:
        prompts = ["one", "two two", "three"]
        fake_vllm.script({" ".join(map(str, ids)): "\nParis\nmore" for ids in backend._token_ids(prompts)})
        backend.generate(prompts, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=1, stop_at_newline=True)
        backend.generate(prompts, max_new_tokens=8)
    (init,) = fake_vllm.events("init")
    assert {"model", *init["kwargs"]} <= set(VLLM_API["LLM"])
    calls = fake_vllm.events("generate")
    assert len(calls) == 3  # the leading newline was continued once
    # nothing but generate after the engine start (the stand-in has no other method; see _run_vllm
    # on reset_prefix_cache)
    assert [e["event"] for e in fake_vllm.events()] == ["init"] + ["generate"] * 3
    passed = {name for call in calls for name in call["given"]}
    assert passed == set(VLLM_API["SamplingParams"])  # sampling, greedy and newline stops use them all
    assert {key for call in calls for prompt in call["prompts"] for key in prompt} == set(VLLM_API["TokensPrompt"])
    read = {(cls, name) for cls, name in reads if not name.startswith("_")}
    assert read == {("RequestOutput", a) for a in VLLM_API["RequestOutput"]} | {
        ("CompletionOutput", f) for f in VLLM_API["CompletionOutput"]}


@pytest.mark.parametrize("given, seen", [(None, "0"), ("1", "1")])
def test_the_engine_runs_in_process_unless_the_user_says_otherwise(fake_vllm, tiny_model, monkeypatch, given, seen):
    # in-process engine = deterministic scheduling (vLLM's reproducibility page): same seed, same file
    if given is None:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", given)
    with make_backend("vllm", tiny_model, num_gpus=1, seed=3, max_model_len=4096, dtype="bf16"):
        pass
    (init,) = fake_vllm.events("init")
    assert init["v1_multiprocessing"] == seen


def test_the_stand_in_follows_the_description(api, fake_vllm):
    import vllm

    problems = [f"fake LLM takes {k!r}, vLLM does not" for k in sorted(vllm._LLM_ARGS - llm_keywords(api))]
    problems += signature_problems("LLM.__init__", vllm.LLM.__init__, _method(api, "LLM"))
    problems += signature_problems("LLM.generate", vllm.LLM.generate, _method(api, "LLM", "generate"))
    problems += signature_problems("RequestOutput.__init__", vllm.RequestOutput.__init__, _method(api, "RequestOutput"))
    assert dataclasses.is_dataclass(vllm.CompletionOutput)
    problems += signature_problems("CompletionOutput", vllm.CompletionOutput.__init__,
                                   _as_init(api["classes"]["CompletionOutput"]["fields"]))
    recorded = {f["name"]: f for f in api["classes"]["SamplingParams"]["fields"]}
    for name, default in vllm._SAMPLING_DEFAULTS.items():
        if name not in recorded:
            problems.append(f"fake SamplingParams has {name!r}, vLLM does not")
        elif ast.literal_eval(recorded[name]["default"]) != default:
            problems.append(f"SamplingParams.{name} defaults to {default!r} in the fake, "
                            f"{recorded[name]['default']} in vLLM")
    assert problems == []
    assert vllm_version() == vllm.__version__ == "0.26.0+fake"
