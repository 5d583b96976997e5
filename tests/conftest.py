import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_VLLM = os.path.join(ROOT, "tests", "fake_vllm")
# prompts of several lengths and kinds, shared by the generation tests
MESSAGES = [
    "hi",
    "What is the capital of France? Answer in one word.",
    "x " * 40,
    "one two three",
    "Who wrote Hamlet, and in which year was it first performed?",
    "Name a river.",
]
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session")
def tiny_model():
    """Path of a tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    from tiny_model import tiny_model_dir

    return tiny_model_dir()


class FakeVLLM:
    """The calls logged by the ``tests/fake_vllm`` stand-in (see its docstring)."""

    def __init__(self, log_path, script_path):
        self.log_path = log_path
        self.script_path = script_path

    def events(self, kind=None):
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        return [e for e in events if kind is None or e["event"] == kind]

    def clear(self):
        if os.path.exists(self.log_path):
            os.remove(self.log_path)

    def script(self, completions: dict):
        self.script_path.write_text(json.dumps(completions))


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """The stand-in first on sys.path and PYTHONPATH (spawned workers import it too), 8 GPUs visible."""
    monkeypatch.syspath_prepend(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (FAKE_VLLM, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "vllm-calls.jsonl"))
    monkeypatch.setenv("FAKE_VLLM_SCRIPT", str(tmp_path / "script.json"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    monkeypatch.delenv("FAKE_VLLM_FAIL_INIT", raising=False)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    fake = FakeVLLM(tmp_path / "vllm-calls.jsonl", tmp_path / "script.json")
    fake.script({})
    yield fake
    sys.modules.pop("vllm", None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: matrices of width 64 gain nothing from more, and on
    a busy 2-core machine the threads' spin-waits made the generation tests 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
