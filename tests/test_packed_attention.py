"""Packed micro-batches (kd/packed_attention.py): the same logits and gradients as padded rows."""

import pytest
import torch

from kd.losses import response_logits
from kd.packed_attention import (
    PACKED_ATTENTION,
    _CallCounter,
    _per_row_attention,
    pack_rows,
    packed_attention_forward,
    register_packed_attention,
)
from kd.pair_dataset import pad_before_tail
from pos2distill.errors import UserError

ROWS = [[5, 17, 99, 1000, 42, 7], [8, 300, 12, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
RESPONSE_LENGTHS = [3, 2, 1]


def _batch():
    return pad_before_tail(ROWS, [n + 1 for n in RESPONSE_LENGTHS], pad_id=0)


def test_pack_rows_keeps_token_order_and_restarts_positions():
    ids, mask = _batch()
    pack = pack_rows(ids, mask)
    assert pack["input_ids"][0].tolist() == sum(ROWS, [])
    assert pack["position_ids"][0].tolist() == sum((list(range(len(r))) for r in ROWS), [])
    assert pack["cu_seq_lens"].tolist() == [0, 6, 10, 19]
    assert pack["cu_seq_lens"].dtype == torch.int32
    assert pack["max_length"] == 9
    assert pack["ends"].tolist() == [6, 10, 19]


def test_pack_rows_rejects_an_empty_row():
    with pytest.raises(UserError, match="without tokens"):
        pack_rows(torch.tensor([[1, 2], [0, 0]]), torch.tensor([[1, 1], [0, 0]]))


def test_per_row_attention_matches_causal_sdpa_on_each_row_with_grouped_heads():
    torch.manual_seed(0)
    lengths = [5, 3, 7]
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    q, k, v = torch.randn(15, 4, 8), torch.randn(15, 2, 8), torch.randn(15, 2, 8)
    got = _per_row_attention(q, k, v, cu, scaling=0.3)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        # independent reference: explicit softmax over the causal scores, key/value head h // 2
        for h in range(4):
            scores = 0.3 * q[rows, h] @ k[rows, h // 2].T
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            want = scores.softmax(-1) @ v[rows, h // 2]
            assert torch.allclose(got[rows, h], want, atol=1e-5), (start, h)
        start += n


def test_packed_attention_needs_packed_inputs():
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(UserError, match="needs packed rows"):
        packed_attention_forward(None, q, q, q, None)


def _model(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def test_packed_response_logits_and_gradients_match_padded(tiny_model):
    register_packed_attention()
    padded_model, packed_model = _model(tiny_model, "sdpa"), _model(tiny_model, PACKED_ATTENTION)
    ids, mask = _batch()
    width = max(RESPONSE_LENGTHS)
    want = response_logits(padded_model, ids, mask, width)
    got = response_logits(packed_model, ids, mask, width, packed=True)
    assert got.shape == want.shape == (3, width, padded_model.config.vocab_size)
    slots = torch.arange(width)[None, :] >= width - torch.tensor(RESPONSE_LENGTHS)[:, None]
    assert torch.allclose(got[slots], want[slots], atol=1e-5)
    # the same loss gives the same gradients in every weight
    weights = torch.randn(int(slots.sum()), got.shape[-1])
    (want[slots] * weights).sum().backward()
    (got[slots] * weights).sum().backward()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4), (name, (a.grad - b.grad).abs().max())


def test_packed_attention_is_not_saved_with_the_model(tiny_model, tmp_path):
    # a checkpoint trained with packing must load anywhere, without this project's registration
    register_packed_attention()
    model = _model(tiny_model, PACKED_ATTENTION)
    model.save_pretrained(tmp_path)
    assert PACKED_ATTENTION not in (tmp_path / "config.json").read_text()


def test_packing_warns_when_cuda_torch_lacks_the_varlen_kernel(monkeypatch):
    import kd.packed_attention as packed
    from kd.train_kd import attention_implementation

    printed = []
    strategy = type("Strategy", (), {"print": staticmethod(printed.append)})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(packed, "_VARLEN", None)
    assert attention_implementation(True, strategy, packing=True) == PACKED_ATTENTION
    assert len(printed) == 1 and "fall back to per-row SDPA" in printed[0]
    monkeypatch.setattr(packed, "_VARLEN", lambda *a, **k: None)
    printed.clear()
    assert attention_implementation(False, strategy, packing=True) == PACKED_ATTENTION and printed == []


@pytest.mark.parametrize("extra, message", [
    ({"sliding_window": 4}, "sliding-window attention"),
    ({"softcap": 30.0}, "softcap"),
])
def test_packed_attention_refuses_what_it_does_not_compute(extra, message):
    q = torch.randn(1, 4, 10, 8)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    kwargs = {"cu_seq_lens_q": cu, "max_length_q": 6}
    out, _ = packed_attention_forward(None, q, q[:, :2], q[:, :2], None, sliding_window=6, **kwargs)
    assert out.shape == (1, 10, 4, 8)  # a window as long as the longest row changes nothing
    with pytest.raises(UserError, match=message):
        packed_attention_forward(None, q, q[:, :2], q[:, :2], None, **kwargs, **extra)


def test_packed_rows_need_every_layer_on_the_packed_kernel(tiny_model):
    # a model loaded with another attention (or mixing tokens outside attention) must not run
    # packed rows: its layers would see across rows
    ids, mask = _batch()
    with pytest.raises(UserError, match="0 of the model's 2 layers ran the packed attention"):
        response_logits(_model(tiny_model, "sdpa"), ids, mask, 3, packed=True)


def test_packed_rows_count_layers_in_compiled_decoder_layers(tiny_model):
    # bench_train --compile compiles each layer: the layer count must survive compilation
    register_packed_attention()
    model = _model(tiny_model, PACKED_ATTENTION)
    ids, mask = _batch()
    with torch.no_grad():
        eager = response_logits(model, ids, mask, 3, packed=True)
        for layer in model.model.layers:
            layer.compile(dynamic=True)
        compiled = response_logits(model, ids, mask, 3, packed=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    # and again with gradients (bench_train's student): each call counts every layer anew
    for _ in range(2):
        response_logits(model, ids, mask, 3, packed=True).sum().backward()
        assert _CallCounter.calls == len(model.model.layers)


@pytest.mark.parametrize("changes, message", [
    ({"layer_types": ["conv", "full_attention"]}, "conv layers"),
    ({"attention_chunk_size": 1024}, "chunks of 1024 tokens"),
])
def test_check_packable_refuses_models_that_mix_tokens_otherwise(changes, message):
    from types import SimpleNamespace

    from kd.packed_attention import check_packable

    check_packable(SimpleNamespace(layer_types=["full_attention", "sliding_attention"]), 4096)
    with pytest.raises(UserError, match=message):
        check_packable(SimpleNamespace(**changes), 4096)


def test_varlen_kernel_is_skipped_when_it_cannot_apply_the_scale(monkeypatch):
    import kd.packed_attention as packed

    query = torch.zeros(3, 2, 16)
    monkeypatch.setattr(packed, "_VARLEN", lambda *a, **k: None)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    half = query.to(torch.bfloat16)
    monkeypatch.setattr(packed, "_VARLEN_PARAMS", frozenset({"is_causal"}))  # torch 2.9: no scale argument
    assert packed.use_varlen_kernel(half, 16 ** -0.5) and packed.use_varlen_kernel(half, None)
    assert not packed.use_varlen_kernel(half, 0.3)
    monkeypatch.setattr(packed, "_VARLEN_PARAMS", frozenset({"window_size", "scale"}))
    assert packed.use_varlen_kernel(half, 0.3) and not packed.use_varlen_kernel(query, None)  # fp32: per row
