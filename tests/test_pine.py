"""PINE (--inference pine): invariance, a slow per-prompt reference, one document = plain, end to end."""

import math
import os
import random
import subprocess
import sys

import pytest
import torch

from pos2distill.pine import build_layout, decode_step, prefill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_qwen2(tokenizer_dir: str, out_dir: str) -> str:
    """A tiny random Qwen2 (attention biases, GQA) around the same tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_tokenizer(request, tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model if request.param == "llama" else tiny_qwen2(tiny_model, str(tmp_path_factory.mktemp("qwen2")))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == request.param
    return model, AutoTokenizer.from_pretrained(path)


def pieces(tokenizer, n_docs, seed=0, question="who wrote it?"):
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    docs = [enc(f"- Title: doc {i}\n" + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                                              for _ in range(rng.randint(2, 9))) + "\n") for i in range(n_docs)]
    return enc("<|im_start|>user\nAnswer from the documents.\n"), docs, enc(f"\nQuestion: {question}\n<|im_start|>assistant\n")


# ----------------------------------------------------------------- the slow reference


def rope(x, pos, theta):
    """Rotary embedding of vectors x [n, d] at positions pos [n] (rotate-half convention)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angle = torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([angle.cos(), angle.cos()], -1).float(), torch.cat([angle.sin(), angle.sin()], -1).float()
    rotated = torch.cat([-x[:, d // 2:], x[:, : d // 2]], -1)
    return x * cos + rotated * sin


def reference_logits(model, prefix, docs, suffix):
    """Next-token logits of PINE for one prompt, written as plainly as possible: loops over
    layers, heads, query tokens and documents; every key rotated at its position for each query."""
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    a, lens = len(prefix), [len(d) for d in docs]
    b = a + sum(lens)
    tokens = prefix + [t for d in docs for t in d] + suffix
    kind, doc_of, offset = [], [], []  # per token: "p"refix, "d"ocument, "s"uffix
    for t in range(len(tokens)):
        if t < a or t >= b:
            kind.append("p" if t < a else "s"), doc_of.append(None), offset.append(None)
        else:
            j, start = 0, a
            while t >= start + lens[j]:
                start += lens[j]
                j += 1
            kind.append("d"), doc_of.append(j), offset.append(t - start)
    docs_tokens = [[t for t in range(len(tokens)) if doc_of[t] == j] for j in range(len(docs))]
    base = [t if kind[t] != "d" else b - lens[doc_of[t]] + offset[t] for t in range(len(tokens))]

    hidden = model.model.embed_tokens(torch.tensor(tokens))
    for layer in model.model.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        d = attn.head_dim
        q = attn.q_proj(x).view(len(tokens), -1, d)
        k = attn.k_proj(x).view(len(tokens), -1, d)
        v = attn.v_proj(x).view(len(tokens), -1, d)
        heads, group = q.shape[1], q.shape[1] // k.shape[1]
        out = torch.zeros_like(q)
        for h in range(heads):
            kh = h // group

            def probs(t, allowed):  # softmax of un-rotated scores over the allowed doc tokens
                s = k[allowed, kh] @ q[t, h] / math.sqrt(d)
                return dict(zip(allowed, torch.softmax(s, 0).tolist()))

            doc_importance = {}
            for i in range(len(docs)):
                others = [s for j in range(len(docs)) if j != i for s in docs_tokens[j]]
                imp = [0.0] * len(docs)
                for t in docs_tokens[i]:
                    if others:
                        p = probs(t, others)
                        for j in range(len(docs)):
                            if j != i:
                                imp[j] += sum(p[s] for s in docs_tokens[j]) / lens[j]
                imp[i] = float("inf")
                doc_importance[i] = imp
            for t in range(len(tokens)):
                if kind[t] == "d":
                    imp = doc_importance[doc_of[t]]
                else:
                    p = probs(t, [s for j in range(len(docs)) for s in docs_tokens[j]])
                    imp = [sum(p[s] for s in docs_tokens[j]) / lens[j] for j in range(len(docs))]
                ranking = sorted(range(len(docs)), key=lambda j: (-imp[j], j))
                shift = {j: sum(lens[r] for r in ranking[: ranking.index(j)]) for j in range(len(docs))}
                key_pos = [base[s] - (shift[doc_of[s]] if kind[s] == "d" else 0) for s in range(len(tokens))]
                visible = [s for s in range(len(tokens)) if key_pos[s] <= base[t]]
                qt = rope(q[t, h][None], [base[t]], theta)[0]
                keys = rope(k[visible, kh], [key_pos[s] for s in visible], theta)  # this query's key positions
                weights = torch.softmax(keys @ qt / math.sqrt(d), 0)
                out[t, h] = weights @ v[visible, kh]
        hidden = hidden + attn.o_proj(out.reshape(len(tokens), -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(model.model.norm(hidden[-1]))


# ----------------------------------------------------------------- tests


def pine_logits(model, rows):
    ids, layout = build_layout(rows, "cpu", 0)
    logits, _ = prefill(model, ids, layout)
    return logits


@torch.no_grad()
def test_invariant_under_document_permutations(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prefix, docs, suffix = pieces(tokenizer, 5)
    reference = pine_logits(model, [(prefix, docs, suffix)])[0]
    rng = random.Random(0)
    orders = set()
    while len(orders) < 12:
        orders.add(tuple(rng.sample(range(5), 5)))
    orders.discard(tuple(range(5)))
    rows = [(prefix, [docs[i] for i in order], suffix) for order in sorted(orders)]
    logits = pine_logits(model, rows)  # all permutations in one padded batch
    assert len(rows) >= 10
    for row in logits:
        torch.testing.assert_close(row, reference, atol=1e-5, rtol=0)
    # plain inference is not invariant: the test can tell
    plain = [model(torch.tensor([prefix + [t for d in ds for t in d] + suffix])).logits[0, -1] for _, ds, _ in rows[:3]]
    assert max((p - plain[0]).abs().max() for p in plain[1:]) > 1e-4


@torch.no_grad()
def test_batched_equals_slow_reference_and_cache_decoding(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = [pieces(tokenizer, 3, seed=1), pieces(tokenizer, 4, seed=2, question="when?"), pieces(tokenizer, 1, seed=3)]
    ids, layout = build_layout(rows, "cpu", 0)
    logits, caches = prefill(model, ids, layout)
    for row, (prefix, docs, suffix) in enumerate(rows):
        torch.testing.assert_close(logits[row], reference_logits(model, prefix, docs, suffix), atol=1e-4, rtol=1e-4)
    # two decoding steps from the cache = the reference with the tokens appended to the suffix
    generated = [[11, 12], [13, 14], [15, 16]]
    for step in range(2):
        tokens = torch.tensor([g[step] for g in generated])
        logits = decode_step(model, tokens, layout.lengths + step, layout, caches)
    for row, (prefix, docs, suffix) in enumerate(rows):
        expected = reference_logits(model, prefix, docs, suffix + generated[row])
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_small_query_chunks_equal_one_chunk(model_and_tokenizer, monkeypatch):
    """Chunking the queries (memory bound) changes nothing: prefill and a decoding step with a
    chunk of one or a few queries equal the default single chunk."""
    import pos2distill.pine_attention as attention

    model, tokenizer = model_and_tokenizer
    rows = [pieces(tokenizer, 4, seed=5), pieces(tokenizer, 2, seed=6, question="where?")]

    def run():
        ids, layout = build_layout(rows, "cpu", 0)
        first, caches = prefill(model, ids, layout)
        return first, decode_step(model, torch.tensor([21, 22]), layout.lengths, layout, caches)

    expected = run()
    for elements in (1, 3000):  # one query per chunk; a few
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", elements)
        for got, want in zip(run(), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_one_document_equals_plain_inference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prefix, docs, suffix = pieces(tokenizer, 1, seed=4)
    tokens = torch.tensor([prefix + docs[0] + suffix])
    torch.testing.assert_close(pine_logits(model, [(prefix, docs, suffix)])[0], model(tokens).logits[0, -1],
                               atol=1e-5, rtol=0)


def test_segmented_prompt_concatenates_to_the_chat_prompt(tiny_model):
    from transformers import AutoTokenizer

    from pos2distill.prompting import SegmentedPrompt, chat_prompt, segmented_chat_prompt, user_message
    from pos2distill.records import Document, Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = [Document(f"t{i}", f"text {i}") for i in range(3)]
    example = Example("q?", ["a"], docs[0], docs[1:])
    prompt = segmented_chat_prompt(tokenizer, example, docs)
    assert isinstance(prompt, SegmentedPrompt) and len(prompt.segments) == 5
    assert prompt == chat_prompt(tokenizer, user_message(example, docs)) == "".join(prompt.segments)
    assert prompt.segments[1] == "- Title: t0\ntext 0\n"


def test_eval_data_inference_pine_end_to_end(tmp_path, tiny_model):
    from pos2distill.jsonl import read_jsonl, write_jsonl
    from test_pipeline_integration import litm_record

    data = tmp_path / "nq-test.jsonl.gz"
    write_jsonl(str(data), [litm_record(i) for i in range(4)])
    common = [sys.executable, os.path.join(ROOT, "eval_data.py"), "--input-path", str(data), "--model", tiny_model,
              "--dataset_name", "nq", "--output-path", str(tmp_path / "evaluate"), "--total_doc", "4",
              "--sample_num", "3", "--max-new-tokens", "6"]
    done = subprocess.run(common + ["--label", "pine", "--inference", "pine", "--backend", "hf", "--batch_size", "5"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    records = read_jsonl(str(tmp_path / "evaluate" / "nq" / "pine" / "predictions_4docs.jsonl.gz"))
    assert len(records) == 3 * 4
    by_example = {}
    for r in records:  # the distractor order is fixed per example: PINE answers the same at every position
        by_example.setdefault(r["example_id"], set()).add(r["prediction"])
    assert all(len(answers) == 1 for answers in by_example.values())
    with open(tmp_path / "evaluate" / "nq" / "pine" / "predictions_4docs.jsonl.gz.config.json") as fh:
        assert '"inference": "pine"' in fh.read()
    refused = subprocess.run(common + ["--label", "x", "--inference", "pine", "--backend", "vllm"],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "error:" in refused.stderr and "hf backend only" in refused.stderr


@torch.no_grad()
@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}])
def test_document_blocks_equal_the_per_query_kernel(tiny_model, rope):
    """The prefill's fused document blocks (keys rotated back by the shifts) equal the explicit
    per-query kernel (each query rotated once per document), also under a rope whose cos/sin carry
    an attention scaling (YaRN), which the key-side rotation must not apply twice."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import pos2distill.pine_attention as attention

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         **({"rope_scaling": rope} if rope else {}))
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(config).eval()
    rotary = model.model.rotary_emb
    assert (rotary.attention_scaling != 1.0) == bool(rope)
    rows = [pieces(tokenizer, 4, seed=7), pieces(tokenizer, 3, seed=8, question="which?")]
    ids, layout = build_layout(rows, "cpu", 0)
    b, n = ids.shape
    heads, kv, d = 4, 2, 16
    q, k, v = torch.randn(b, heads, n, d), torch.randn(b, kv, n, d), torch.randn(b, kv, n, d)
    docs, plain = attention.prefill_cache(k, v, layout, rotary)
    scaling = d ** -0.5
    fused = attention.pine_attention(q, docs, plain, layout, rotary, scaling, prefill=True)
    # the explicit kernel for every prompt token, with the document rankings of the fused path
    per_doc, per_token = attention.prompt_importance(q, docs, layout, scaling)
    doc_shift = attention.shifts_from_importance(per_doc, layout.doc_len)
    q_doc, q_pos = layout.query_doc, layout.query_pos
    rows_shift = doc_shift.gather(2, q_doc.clamp(min=0)[:, None, :, None].expand(b, heads, -1, doc_shift.shape[-1]))
    shift = torch.where((q_doc >= 0)[:, None, :, None], rows_shift,
                        attention.shifts_from_importance(per_token, layout.doc_len))
    # the visibility rule, written out: own document causal, other documents for any query past the prefix
    own = q_doc[:, :, None] == torch.arange(layout.doc_valid.shape[1])
    causal = layout.doc_pos[:, None] <= q_pos[:, :, None, None]
    after_prefix = (q_pos >= layout.doc_start[:, None])[:, :, None, None]
    visible = layout.doc_valid[:, None] & torch.where(own[..., None], causal, after_prefix)
    plain_visible = layout.plain_valid[:, None] & (layout.plain_pos[:, None] <= q_pos[:, :, None])
    explicit = attention.attend(q, q_pos, shift, visible, docs, plain, plain_visible, rotary, scaling)
    for row, length in enumerate(layout.lengths.tolist()):
        torch.testing.assert_close(fused[row, :, :length], explicit[row, :, :length], atol=1e-5, rtol=1e-5)
