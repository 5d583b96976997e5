"""The random-weight model builder (pos2distill/model_shapes.py): published shapes, tiny builds."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pos2distill import model_shapes
from pos2distill.models import embedded_tokenizer_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_count(c) -> int:
    """Parameters of a Llama-style decoder from its numbers alone (embedding, head unless tied,
    per layer q/k/v/o + gate/up/down + two norms, the final norm; Qwen2 adds q/k/v biases)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    if c.model_type == "qwen2":
        attention += q + 2 * kv
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_hidden_layers * layer + c.hidden_size


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen2.5-3b", "qwen2.5-1.5b", "mistral-7b", "llama3-8b"])
def test_published_shapes_have_the_published_parameter_counts(name):
    _, fields, published = model_shapes.SHAPES[name]
    config = model_shapes.shape_config(name)
    counted = model_shapes.count_parameters(config)  # meta device: no memory
    assert counted == dense_count(config)
    assert abs(counted - published) / published < 0.005, (counted, published)
    assert config.vocab_size == fields["vocab_size"] and config.num_key_value_heads == fields["num_key_value_heads"]


def test_shape_numbers_spot_checks():
    qwen7 = model_shapes.shape_config("qwen2.5-7b")
    assert (qwen7.hidden_size, qwen7.intermediate_size, qwen7.num_hidden_layers) == (3584, 18944, 28)
    assert qwen7.rope_parameters["rope_theta"] == 1e6 and not qwen7.tie_word_embeddings
    assert model_shapes.shape_config("qwen2.5-3b").tie_word_embeddings
    llama = model_shapes.shape_config("llama3-8b")
    assert llama.rope_parameters["rope_theta"] == 5e5 and llama.max_position_embeddings == 8192
    assert model_shapes.shape_config("mistral-7b").vocab_size == 32768


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_tiny_shape_saves_and_reloads_with_the_same_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = model_shapes.write_model_folder(name, str(tmp_path / name), embedded_tokenizer_dir(), seed=3)
    tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    built = model_shapes.model_for_shape(name, tokenizer, seed=3)  # the same seed: the same weights
    ids = tokenizer("Where is Paris? It is in France.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(built(ids).logits, reloaded(ids).logits)
    other = model_shapes.model_for_shape(name, tokenizer, seed=4)
    assert not torch.equal(other.model.embed_tokens.weight, built.model.embed_tokens.weight)
    weights = dict(built.named_parameters())
    norm = next(p for n, p in weights.items() if n.endswith("norm.weight"))
    matrix = weights["model.layers.0.mlp.up_proj.weight"]
    assert torch.all(norm == 1) and 0.015 < float(matrix.detach().std()) < 0.025  # the cheap init, not the default
    assert reloaded.config.eos_token_id == tokenizer.eos_token_id
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == (name == "tiny-llama")


def test_cut_tokenizer_keeps_every_id_below_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    size = 2000
    model_shapes.cut_tokenizer(embedded_tokenizer_dir(), str(tmp_path), size)
    cut = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(cut) <= size < len(source)
    text = "Document [3](Title: Zürich) The Limmat flows through Zürich; 1848 was a year."
    chat = [{"role": "user", "content": text}]
    prompt = source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert cut.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == prompt
    ids = cut(prompt, add_special_tokens=False)["input_ids"]
    assert max(ids) < size and cut.decode(ids) == prompt
    assert len(ids) > len(source(prompt, add_special_tokens=False)["input_ids"])  # fewer merges: more tokens
    assert cut.eos_token == source.eos_token and cut.eos_token_id < size


def test_cli_writes_a_folder_and_refuses_an_existing_one(tmp_path):
    out = tmp_path / "m"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "pos2distill.model_shapes", "--shape", "tiny-llama", "--out", str(out),
           "--dtype", "float32", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert again.returncode == 2 and again.stderr.startswith("error: --out") and (out / "config.json").exists()
