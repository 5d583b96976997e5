import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session")
def tiny_model():
    """Path of a tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    from tiny_model import tiny_model_dir

    return tiny_model_dir()
