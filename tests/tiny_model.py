"""A tiny random chat model (hidden 64, 2 layers) around the real SmolLM2 tokenizer.

Loads, generates and back-propagates in about a second on CPU; used by tests
that need a real model folder without downloading anything.
"""

import os
import shutil

from pos2distill.models import cache_dir, embedded_tokenizer_dir


def build_tiny_model(out_dir: str, seed: int = 0, layers: int = 2, hidden: int = 64) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = f"{out_dir}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def tiny_model_dir() -> str:
    """A cached tiny model folder (built once per cache directory)."""
    out = os.path.join(cache_dir(), "test-models", "tiny-llama-smollm2-tok")
    if not os.path.exists(os.path.join(out, "config.json")):
        build_tiny_model(out)
    return out
