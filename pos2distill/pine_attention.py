"""PINE attention for one decoder layer, batched (Wang et al., ICLR 2025, arXiv 2407.01100).

A prompt is a prefix, k documents and a suffix (then the generated tokens). Every token has a
*base position*: prefix tokens 0..a-1, suffix and generated tokens their input positions (the
document region has the same total length in any order, so these do not depend on the order).
Document token l of document j has the *end-packed* base position ``b - len_j + l`` (b = end
of the document region), i.e. as if j were the last document. Per layer and per query head,
each query sees document j shifted down by ``shift_j`` = the summed lengths of the documents
ranked more important than j; the most important one stays last, nearest to the suffix:

- importance, from this layer's queries and keys *without* rotary embedding, softmax over the
  document tokens only: for a suffix or generated token t, ``imp_t(j) = sum_{s in j} p_t(s) /
  len_j``; for a query in document i (one ranking per document, not per token),
  ``imp_i(j) = sum_{t in i} sum_{s in j} p_t(s) / len_j`` with the softmax over the *other*
  documents' tokens (our choice: the own document is ranked first anyway);
- the query's own document is ranked first (shift 0, causal inside); ties keep document order
  (the only place input order can matter: exact float ties);
- a key is visible when its assigned position is <= the query's position, which gives: prefix
  causal, documents bidirectional between each other and causal inside, suffix sees all.

Queries keep their base positions; a query in document i has its end-packed position. With
RoPE, ``<R(m) q, R(n - shift) k> = <R(m + shift) q, R(n) k>``: keys are rotated once by their
base position (so they can be cached) and each query is rotated once per document (k + 1
copies), never a key per query. Scores and softmax are explicit fp32 matmuls, not SDPA: a
key's rotation depends on the query. Memory is bounded by chunking the queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# elements of the largest [B, heads, queries, docs, doc length] intermediate of one query chunk
CHUNK_ELEMENTS = 1 << 26


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x, cos, sin):
    return x * cos + rotate_half(x) * sin


@dataclass
class DocKV:
    """One layer's cached document keys/values, document-major ``[B, kv_heads, K, L, d]``."""

    raw_k: torch.Tensor  # without rotary embedding (importance)
    rot_k: torch.Tensor  # rotated by the end-packed base position
    v: torch.Tensor


@dataclass
class PlainKV:
    """One layer's cached prefix/suffix/generated keys (rotated) and values ``[B, kv_heads, P, d]``."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class Layout:
    """Where each prompt's pieces are, as tensors on the model's device.

    ``doc_index``/``plain_index``: token-major column of each document slot / plain token;
    ``*_valid`` false on padding; ``doc_pos``: end-packed base positions; ``plain_pos``: base
    positions (grown by one column per generated token); ``query_doc``: the document of each
    prompt token (-1 outside documents); ``query_pos``: its base position.
    """

    doc_index: torch.Tensor  # [B, K, L]
    doc_valid: torch.Tensor
    doc_len: torch.Tensor  # [B, K]
    doc_pos: torch.Tensor  # [B, K, L]
    plain_index: torch.Tensor  # [B, P]
    plain_valid: torch.Tensor
    plain_pos: torch.Tensor
    query_doc: torch.Tensor  # [B, N]
    query_pos: torch.Tensor  # [B, N]
    lengths: torch.Tensor  # [B] prompt tokens per row


def _gather_tokens(x, index):
    """x [B, h, N, d], index [B, ...] -> [B, h, ..., d]."""
    b, h, _, d = x.shape
    flat = index.reshape(b, 1, -1, 1).expand(b, h, -1, d)
    return x.gather(2, flat).view(b, h, *index.shape[1:], d)


def prefill_cache(k, v, layout: Layout, rotary):
    """Document-major and plain caches of one layer from its prompt keys/values ``[B, kv, N, d]``."""
    dk, dv = _gather_tokens(k, layout.doc_index), _gather_tokens(v, layout.doc_index)
    b, kv, n_docs, length, d = dk.shape
    cos, sin = rotary(dk, layout.doc_pos.view(b, -1))
    rot = rotate(dk, cos.view(b, 1, n_docs, length, d), sin.view(b, 1, n_docs, length, d))
    pk, pv = _gather_tokens(k, layout.plain_index), _gather_tokens(v, layout.plain_index)
    cos, sin = rotary(pk, layout.plain_pos)
    return DocKV(dk, rot, dv), PlainKV(rotate(pk, cos.unsqueeze(1), sin.unsqueeze(1)), pv)


def _grouped(x, kv_heads):
    """[B, H, ...] -> [B, kv_heads, H // kv_heads, ...] (GQA: query heads sharing a kv head)."""
    return x.view(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _chunk(batch, heads, docs, length, dim):
    return max(1, CHUNK_ELEMENTS // max(1, batch * heads * max(docs, 1) * max(length, dim, 1)))


def doc_probabilities(q, docs: DocKV, layout: Layout, scaling, exclude_doc=None):
    """Softmax of un-rotated scores over the document slots, summed per document: [B, H, T, K].

    ``exclude_doc`` [B, T] (or None): a document whose slots are left out for that query.
    """
    g = _grouped(q, docs.raw_k.shape[1])
    scores = torch.einsum("bgrtd,bgjld->bgrtjl", g.float(), docs.raw_k.float()) * scaling
    mask = layout.doc_valid[:, None, None, None]  # [B, 1, 1, 1, K, L]
    if exclude_doc is not None:
        n_docs = layout.doc_valid.shape[1]
        own = exclude_doc[:, :, None] == torch.arange(n_docs, device=q.device)  # [B, T, K]
        mask = mask & ~own[:, None, None, :, :, None]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    b, kv, r, t, n_docs, length = scores.shape
    p = torch.softmax(scores.view(b, kv, r, t, -1), dim=-1).view(scores.shape) * mask
    return p.sum(-1).reshape(b, kv * r, t, n_docs)


def shifts_from_importance(importance, doc_len):
    """Position shift of each document [B, H, T, K] from importance [B, H, T, K]: the summed
    lengths of the documents ranked before it (more important; ties: lower index first)."""
    n_docs = importance.shape[-1]
    a = importance.unsqueeze(-1)  # j' along dim -2
    c = importance.unsqueeze(-2)  # j along dim -1
    index = torch.arange(n_docs, device=importance.device)
    before = (a > c) | ((a == c) & (index[:, None] < index[None, :]))
    return (before.to(doc_len.dtype) * doc_len[:, None, None, :, None]).sum(-2)


def document_importance(q, docs: DocKV, layout: Layout, scaling):
    """imp_i(j) for every document query block: [B, H, K(i), K(j)], own document = +inf."""
    b, heads, n, _ = q.shape
    n_docs, length = layout.doc_valid.shape[1:]
    total = q.new_zeros((b, heads, n_docs, n_docs), dtype=torch.float32)
    step = _chunk(b, heads, n_docs, length, 1)
    for begin in range(0, n, step):
        qd = layout.query_doc[:, begin : begin + step]
        p = doc_probabilities(q[:, :, begin : begin + step], docs, layout, scaling, exclude_doc=qd)
        onehot = (qd[:, :, None] == torch.arange(n_docs, device=q.device)).float()  # [B, T, K(i)]
        total += torch.einsum("bhtj,bti->bhij", p, onehot)
    total = total / layout.doc_len.clamp(min=1)[:, None, None, :].float()
    own = torch.eye(n_docs, dtype=torch.bool, device=q.device)
    return total.masked_fill(own, float("inf"))


def attend(q, q_pos, shift, docs: DocKV, plain: PlainKV, layout: Layout, rotary, scaling):
    """Attention output [B, H, T, d] of queries q [B, H, T, d] (un-rotated) at base positions
    q_pos [B, T], documents shifted by ``shift`` [B, H, T, K]."""
    b, heads, t, d = q.shape
    kv = docs.rot_k.shape[1]
    n_docs, length = layout.doc_valid.shape[1:]
    cos, sin = rotary(q, q_pos)
    q_plain = _grouped(rotate(q, cos.unsqueeze(1), sin.unsqueeze(1)), kv)
    pos = q_pos[:, None, :, None] + shift  # [B, H, T, K]
    cos, sin = rotary(q, pos.reshape(b, -1))
    cos, sin = cos.view(b, heads, t, n_docs, d), sin.view(b, heads, t, n_docs, d)
    q_docs = _grouped(q.unsqueeze(3) * cos + rotate_half(q).unsqueeze(3) * sin, kv)

    s_plain = torch.einsum("bgrtd,bgpd->bgrtp", q_plain.float(), plain.k.float()) * scaling
    m_plain = layout.plain_valid[:, None, None, None, :] & (layout.plain_pos[:, None, None, None, :]
                                                            <= q_pos[:, None, None, :, None])
    s_docs = torch.einsum("bgrtjd,bgjld->bgrtjl", q_docs.float(), docs.rot_k.float()) * scaling
    assigned = layout.doc_pos[:, None, None, None] - _grouped(shift, kv)[..., None]  # [B, kv, r, T, K, L]
    m_docs = layout.doc_valid[:, None, None, None] & (assigned <= q_pos[:, None, None, :, None, None])
    low = torch.finfo(torch.float32).min
    scores = torch.cat([s_plain.masked_fill(~m_plain, low),
                        s_docs.masked_fill(~m_docs, low).flatten(-2)], dim=-1)
    p = torch.softmax(scores, dim=-1)
    p_plain, p_docs = p.split([s_plain.shape[-1], n_docs * length], dim=-1)
    out = torch.einsum("bgrtp,bgpd->bgrtd", p_plain.to(plain.v.dtype), plain.v)
    out = out + torch.einsum("bgrtjl,bgjld->bgrtd", p_docs.view(s_docs.shape).to(docs.v.dtype), docs.v)
    return out.reshape(b, heads, t, d)


def pine_attention(q, docs: DocKV, plain: PlainKV, layout: Layout, rotary, scaling, *, prefill: bool,
                   q_pos=None):
    """One layer's PINE attention output [B, H, T, d] for un-rotated queries q [B, H, T, d].

    ``prefill``: q are the prompt tokens (token-major, as in ``layout``); else generated tokens
    at base positions ``q_pos`` [B, T] (they rank the documents as suffix tokens do).
    """
    b, heads, t, _ = q.shape
    n_docs, length = layout.doc_valid.shape[1:]
    if prefill:
        q_pos, q_doc = layout.query_pos, layout.query_doc
        per_doc = document_importance(q, docs, layout, scaling)  # [B, H, K, K]
    else:
        q_doc = torch.full((b, t), -1, dtype=torch.long, device=q.device)
    outputs = []
    step = _chunk(b, heads, n_docs, length, q.shape[-1])
    for begin in range(0, t, step):
        qc, dc = q[:, :, begin : begin + step], q_doc[:, begin : begin + step]
        importance = doc_probabilities(qc, docs, layout, scaling) / layout.doc_len.clamp(min=1)[:, None, None, :]
        if prefill:
            in_doc = dc >= 0
            rows = per_doc.gather(2, dc.clamp(min=0)[:, None, :, None].expand(b, heads, -1, n_docs))
            importance = torch.where(in_doc[:, None, :, None], rows, importance)
        shift = shifts_from_importance(importance, layout.doc_len)
        outputs.append(attend(qc, q_pos[:, begin : begin + step], shift, docs, plain, layout, rotary, scaling))
    return torch.cat(outputs, dim=2)
