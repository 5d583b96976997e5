"""Random-weight models at the shapes of published checkpoints (memory, speed and code paths
at 7B/8B size without the weights).

Each shape holds the architecture numbers of the model's public ``config.json`` (hidden size,
layers, heads, KV heads, intermediate size, vocabulary, RoPE, norms, tying, context, sliding
window). ``build_model`` makes the model directly on the target device with a cheap seeded
init (normal(0, 0.02) matrices, unit norms, zero biases) instead of transformers' default one,
which for 7B on a CPU takes minutes. ``write_model_folder`` saves a Hugging Face folder with a
tokenizer:

- Qwen shapes: the given tokenizer (Qwen's: its 151,665 ids fit the 151,936/152,064 rows).
- Shapes whose vocabulary is smaller than the tokenizer's (Mistral-7B-v0.3: 32,768, Llama-3:
  128,256): the tokenizer is *cut* to the shape's size (``cut_tokenizer``): byte-level BPE
  tokens and merges past the size are dropped, the special tokens renumbered below it. The
  embedding keeps the published size (its memory and FLOPs are the real ones) and every id
  the tokenizer emits is valid; prompts come out longer, as with a real smaller vocabulary.

    python -m pos2distill.model_shapes --shape qwen2.5-7b --out /root/work/qwen2.5-7b \
        --dtype bfloat16 --tokenizer .carry/qwen_tokenizer
    python -m pos2distill.model_shapes --list
"""

import argparse
import contextlib
import json
import os
import shutil
import sys

from .errors import UserError, run_cli
from .jsonl import temporary_name

_QWEN25 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=32768, use_sliding_window=False, attention_dropout=0.0)
_LLAMA_MLP = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-5,
                  tie_word_embeddings=False, attention_dropout=0.0)

# name -> (hub id whose config.json the numbers come from, config fields, published parameter count)
SHAPES = {
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", dict(
        _QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, sliding_window=131072,
        max_window_layers=28), 7.62e9),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", dict(
        _QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, sliding_window=32768,
        max_window_layers=70), 3.09e9),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", dict(
        _QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, sliding_window=32768,
        max_window_layers=21), 1.54e9),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", dict(
        _QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, sliding_window=32768,
        max_window_layers=21), 0.494e9),
    "mistral-7b": ("mistralai/Mistral-7B-Instruct-v0.3", dict(
        _LLAMA_MLP, model_type="mistral", vocab_size=32768, rope_theta=1000000.0, max_position_embeddings=32768,
        sliding_window=None), 7.25e9),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B-Instruct", dict(
        _LLAMA_MLP, model_type="llama", vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        rope_scaling=None, attention_bias=False, mlp_bias=False), 8.03e9),
    # for tests: a few hundred thousand parameters, vocabulary from the tokenizer
    "tiny-qwen2": ("test shape", dict(
        _QWEN25, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False, sliding_window=None,
        max_window_layers=2, max_position_embeddings=8192), None),
    "tiny-llama": ("test shape", dict(
        _LLAMA_MLP, model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=None, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=True), None),
}
INIT_STD = 0.02


def shape_names() -> list:
    return list(SHAPES)


def shape_config(name: str, vocab_size: int = None):
    """The transformers config of shape ``name``; ``vocab_size`` fills a tiny shape's vocabulary
    (a published shape keeps its own)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise UserError(f"--shape {name!r}: unknown shape (known: {', '.join(SHAPES)})")
    fields = dict(SHAPES[name][1])
    if fields["vocab_size"] is None:
        if vocab_size is None:
            raise UserError(f"--shape {name}: a test shape takes its vocabulary from the tokenizer")
        fields["vocab_size"] = vocab_size
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def count_parameters(config) -> int:
    """Parameters of ``config``'s causal LM (tied weights once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _skip_default_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5: its default init then runs (slow for 7B on a CPU only)
        return contextlib.nullcontext()
    return no_init_weights()


def build_model(config, device="cpu", dtype=None, seed: int = 0):
    """The causal LM of ``config`` on ``device`` with seeded random weights: matrices and
    embeddings normal(0, INIT_STD), norm weights 1, biases 0 (transformers' default init skipped)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    with torch.device(device), _skip_default_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipping init_weights also skips tying
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:  # RMSNorm weights
                param.fill_(1.0)
    model.config.use_cache = False
    return model


def cut_tokenizer(src_dir: str, out_dir: str, size: int) -> None:
    """Save the byte-level BPE tokenizer of ``src_dir`` to ``out_dir`` with every id below ``size``.

    Regular tokens keep their ids below ``size - specials``; merges that need a dropped token
    go; special (added) tokens are renumbered to the ids just below ``size``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    with open(os.path.join(_saved(tokenizer, out_dir), "tokenizer.json"), encoding="utf-8") as handle:
        spec = json.load(handle)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{src_dir}: cutting the vocabulary needs a BPE tokenizer, got {model.get('type')}")
    added = sorted(spec["added_tokens"], key=lambda token: token["id"])
    keep = size - len(added)
    if keep < 256:
        raise UserError(f"vocabulary {size} too small for {len(added)} special tokens and the 256 byte tokens")
    vocab = {token: i for token, i in model["vocab"].items() if i < keep}
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    model["vocab"], model["merges"] = vocab, merges
    for offset, token in enumerate(added):
        token["id"] = keep + offset
        vocab.pop(token["content"], None)
    _write_json(os.path.join(out_dir, "tokenizer.json"), spec)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    decoder = tokenizer_config.get("added_tokens_decoder")
    if decoder:  # keyed by id: renumber as in tokenizer.json
        old_ids = {t["content"]: i for i, t in decoder.items()}
        tokenizer_config["added_tokens_decoder"] = {
            str(token["id"]): decoder[old_ids[token["content"]]] for token in added if token["content"] in old_ids}
    _write_json(config_path, tokenizer_config)


def _saved(tokenizer, out_dir):
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)


def resolve_tokenizer(path: str) -> str:
    """A tokenizer folder, or a .gguf file whose tokenizer is extracted once (pos2distill.models)."""
    from .models import _gguf_cache_folder, convert_gguf

    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"--tokenizer {path}: file does not exist")
        out = _gguf_cache_folder(path, "-tokenizer")
        if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
            convert_gguf(path, out, tokenizer_only=True)
        return out
    if not os.path.isdir(path):
        raise UserError(f"--tokenizer {path}: not a folder or .gguf file")
    return path


def load_shape_tokenizer(name: str, tokenizer_dir: str, work_dir: str):
    """The tokenizer to pair with shape ``name``: ``tokenizer_dir``'s own, or (shape vocabulary
    smaller than the tokenizer) a cut copy saved under ``work_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = SHAPES[name][1]["vocab_size"]
    if size is not None and len(tokenizer) > size:
        cut_tokenizer(tokenizer_dir, work_dir, size)
        tokenizer = AutoTokenizer.from_pretrained(work_dir)
        if len(tokenizer) > size:
            raise UserError(f"cut tokenizer still has {len(tokenizer)} ids for vocabulary {size}")
    return tokenizer


def model_for_shape(name: str, tokenizer, device="cpu", dtype=None, seed: int = 0):
    """``build_model`` of shape ``name`` with the tokenizer's special ids in its config."""
    config = shape_config(name, vocab_size=len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    return build_model(config, device, dtype, seed)


def write_model_folder(name: str, out_dir: str, tokenizer_dir: str, device="cpu", dtype=None, seed: int = 0) -> str:
    """A Hugging Face folder (config, safetensors, tokenizer) of shape ``name``, written atomically."""
    if os.path.exists(out_dir):
        raise UserError(f"--out {out_dir} already exists (nothing overwritten)")
    tmp = temporary_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tokenizer = load_shape_tokenizer(name, resolve_tokenizer(tokenizer_dir), tmp)
        model = model_for_shape(name, tokenizer, device, dtype, seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=shape_names(), help="the shape to build")
    parser.add_argument("--out", help="the Hugging Face folder to write (must not exist)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or .gguf file (default: the embedded SmolLM2's; Qwen's for real runs)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="weight dtype (default: bfloat16)")
    parser.add_argument("--device", default="auto", help="where to build: auto (cuda if any, default), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="init seed (default: 0)")
    parser.add_argument("--list", action="store_true", help="print the shapes and their parameter counts")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.list:
        for name, (source, fields, published) in SHAPES.items():
            if published:
                print(f"{name:<14} {count_parameters(shape_config(name)) / 1e9:6.2f}B  {source}")
        return 0
    if not args.shape or not args.out:
        raise UserError("--shape and --out are required (or --list)")
    import time

    import torch

    from .models import embedded_tokenizer_dir

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    began = time.perf_counter()
    write_model_folder(args.shape, args.out, args.tokenizer or embedded_tokenizer_dir(), device,
                       getattr(torch, args.dtype), args.seed)
    print(f"wrote {args.out} ({args.shape}, {args.dtype}, built on {device}) in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
