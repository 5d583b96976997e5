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
- a key is visible when its assigned position is <= the query's position. Because the own
  document is ranked first, that rule never depends on the shifts: prefix queries see the prefix
  (causal) and no document; a document query sees its own document causally and every other
  document fully (``document_queries``' mask); suffix and generated tokens see everything
  (``plain_visibility``).

Queries keep their base positions; a query in document i has its end-packed position. With
RoPE, ``<R(m) q, R(n - shift) k> = <R(m + shift) q, R(n) k>``: keys are rotated once by their
base position (so they can be cached). Two kernels use that identity:

- prefill, document queries (nearly all prompt tokens): the queries of document i share one
  ranking, so document j's keys are rotated back by ``shift_ij`` for that block and each
  (row, document) block is one fused ``scaled_dot_product_attention`` with a structural mask
  (``document_queries``). The importance is one fused attention too, whose values are a one-hot
  of each key's document (``prompt_importance``); scores are never stored.
- plain queries (prefix, suffix, generated tokens; a few per row), each with its own ranking: the
  query is rotated once per document (k + 1 copies) and scores are explicit fp32 GEMMs with the
  softmax scale in the GEMM (``_gemm``), the softmax in place (``attend``).

With half-precision weights on a GPU ``pine.pine_generate`` lets the explicit GEMMs use TF32: the
score GEMMs' inputs are bf16/fp16 values, which TF32 holds exactly (only the summation order
changes); the probability x value GEMMs round the fp32 probabilities to TF32 (10 mantissa bits,
finer than the bf16 probabilities of a half-precision SDPA kernel). The importance attention runs
in fp32 (its ranking decides positions: bf16 would make ties); the document blocks run in the
model's dtype. Memory is bounded by chunking rows, blocks and queries (``CHUNK_ELEMENTS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# elements of the largest fp32 intermediate of one query chunk ([B, heads, queries, docs, doc length]): 1 GiB
CHUNK_ELEMENTS = 1 << 28


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x, cos, sin):
    return x * cos + rotate_half(x) * sin


@dataclass
class DocKV:
    """One layer's cached document keys/values in fp32, document-major ``[B, kv_heads, K, L, d]``
    (fp32 so that no decoding step converts them again)."""

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
    prompt token (-1 outside documents); ``query_pos``: its base position; ``doc_start``: the
    first document position of each row (the prefix length a).
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
    doc_start: torch.Tensor  # [B]


LOW = torch.finfo(torch.float32).min


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
    return DocKV(dk.float(), rot.float(), dv.float()), PlainKV(rotate(pk, cos.unsqueeze(1), sin.unsqueeze(1)), pv)


def _grouped(x, kv_heads):
    """[B, H, ...] -> [B, kv_heads, H // kv_heads, ...] (GQA: query heads sharing a kv head)."""
    return x.view(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _gemm(a, b, alpha=1.0):
    """``alpha * a @ b`` in fp32 for a [..., M, k], b [..., k, N] with equal leading dims (one
    batched GEMM; alpha is applied inside it, not as another pass over the output)."""
    lead = a.shape[:-2]
    a3, b3 = a.float().reshape(-1, *a.shape[-2:]), b.float().reshape(-1, *b.shape[-2:])
    out = torch.baddbmm(a3.new_zeros(()).expand(1, 1, 1), a3, b3, beta=0.0, alpha=alpha)
    return out.view(*lead, a.shape[-2], b.shape[-1])


def _per_chunk(units, per_unit):
    """How many units (rows, blocks, queries) of ``per_unit`` elements one chunk holds."""
    return max(1, min(units, CHUNK_ELEMENTS // max(1, per_unit)))


def plain_visibility(layout: Layout, q_pos):
    """(document slots [B, T, K, L], plain keys [B, T, P]) seen by plain queries (prefix, suffix,
    generated tokens) at base positions q_pos [B, T]: a prefix query sees no document and the
    prefix causally; a later one every document and every plain key up to itself (the module
    docstring: this does not depend on the shifts)."""
    after_prefix = (q_pos >= layout.doc_start[:, None])[:, :, None, None]
    plain = layout.plain_valid[:, None] & (layout.plain_pos[:, None] <= q_pos[:, :, None])
    return layout.doc_valid[:, None] & after_prefix, plain


def doc_probabilities(q, docs: DocKV, mask, scaling):
    """Softmax of un-rotated scores over the document slots in ``mask`` [B, T, K, L], summed per
    document: [B, H, T, K] (zeros for a query that sees no slot)."""
    b, heads, t, d = q.shape
    kv, n_docs, length = docs.raw_k.shape[1:4]
    r = heads // kv
    keys = docs.raw_k.view(b, kv, n_docs * length, d).transpose(-1, -2)
    s = _gemm(_grouped(q, kv).reshape(b, kv, r * t, d), keys, scaling).view(b, kv, r, t, n_docs, length)
    s.masked_fill_(~mask[:, None, None], LOW)
    top = s.amax(dim=(-2, -1), keepdim=True)
    per_doc = s.sub_(top).exp_().sum(-1)  # [B, kv, r, T, K]
    total = per_doc.sum(-1, keepdim=True)
    p = torch.where(top[..., 0] > LOW, per_doc / total, torch.zeros_like(per_doc))  # all masked: zeros
    return p.reshape(b, heads, t, n_docs)


def shifts_from_importance(importance, doc_len):
    """Position shift of each document [B, H, T, K] from importance [B, H, T, K]: the summed
    lengths of the documents ranked before it (more important; ties: lower index first)."""
    n_docs = importance.shape[-1]
    a = importance.unsqueeze(-1)  # j' along dim -2
    c = importance.unsqueeze(-2)  # j along dim -1
    index = torch.arange(n_docs, device=importance.device)
    before = (a > c) | ((a == c) & (index[:, None] < index[None, :]))
    return (before.to(doc_len.dtype) * doc_len[:, None, None, :, None]).sum(-2)


def prompt_importance(q, docs: DocKV, layout: Layout, scaling):
    """(imp_i(j) of every document query block [B, H, K(i), K(j)] with own document = +inf,
    imp_t(j) of every prompt token [B, H, N, K]: used for the suffix tokens).

    One fused attention per chunk of rows: un-rotated fp32 queries and document keys, the values a
    one-hot of each slot's document, so the output is each document's probability mass
    ``sum_{s in j} p_t(s)`` without the scores ever being stored."""
    b, heads, n, d = q.shape
    kv, n_docs, length = docs.raw_k.shape[1:4]
    slots = n_docs * length
    lengths = layout.doc_len.clamp(min=1)[:, None, None, :].float()
    width = -(-n_docs // 8) * 8  # value width a multiple of 8 (fused kernels' alignment)
    slot_doc = torch.arange(slots, device=q.device) // length
    onehot = (slot_doc[:, None] == torch.arange(width, device=q.device)).float()  # [KL, width]
    mass = []
    step = _per_chunk(b, heads * n * max(slots, d))
    for begin in range(0, b, step):
        rows = slice(begin, begin + step)
        keys = docs.raw_k[rows].reshape(-1, kv, slots, d).repeat_interleave(heads // kv, dim=1)
        qd = layout.query_doc[rows]
        # a document query leaves out its own document; a plain one (qd = -1) sees all
        mask = layout.doc_valid[rows].reshape(-1, 1, slots) & (qd[:, :, None] != slot_doc)
        values = onehot.expand(keys.shape[0], heads, slots, width).contiguous()  # fused kernels want dense strides
        out = F.scaled_dot_product_attention(q[rows].float(), keys, values, attn_mask=mask[:, None], scale=scaling)
        mass.append(out[..., :n_docs].nan_to_num(0.0))  # a query that sees no slot: zeros
    p = torch.cat(mass)  # [B, H, N, K]
    onehot_q = (layout.query_doc[:, :, None] == torch.arange(n_docs, device=q.device)).float()  # [B, N, K(i)]
    per_doc = torch.einsum("bhtj,bti->bhij", p, onehot_q)
    own = torch.eye(n_docs, dtype=torch.bool, device=q.device)
    return (per_doc / lengths).masked_fill(own, float("inf")), p / lengths


def document_queries(q, docs: DocKV, plain: PlainKV, layout: Layout, rotary, scaling, doc_shift):
    """Attention output [B, H, K, L, d] of the document queries (prompt tokens in documents).

    All queries of document i share one ranking, so the keys can carry the shifts instead:
    document j's keys rotated back by ``shift_ij`` (``R(n - s) k = R(-s) R(n) k``) and the query at
    its own position. Each (row, document) block is then one fused attention over the plain and
    document keys, with a structural mask (prefix visible, own document causal, others fully)."""
    b, heads, _, d = q.shape
    kv, n_docs, length = docs.rot_k.shape[1:4]
    r, n_plain = heads // kv, plain.k.shape[2]
    qd = _gather_tokens(q, layout.doc_index)  # [B, H, K, L, d]
    cos, sin = rotary(qd, layout.doc_pos.view(b, -1))
    qd = rotate(qd, cos.view(b, 1, n_docs, length, d), sin.view(b, 1, n_docs, length, d))
    qd = qd.transpose(1, 2).reshape(b * n_docs, heads, length, d)
    outputs = []
    pairs = b * n_docs
    # the shifts' rotation is a pure one: the cached keys already carry the rope's attention scaling (YaRN: != 1)
    unscale = getattr(rotary, "attention_scaling", 1.0)
    step = _per_chunk(pairs, heads * (n_plain + n_docs * length) * max(d, length))
    for begin in range(0, pairs, step):
        index = torch.arange(begin, min(pairs, begin + step), device=q.device)
        rows, own = index // n_docs, index % n_docs
        shift = doc_shift[rows, :, own]  # [n, H, K(j)]
        cos, sin = rotary(docs.rot_k, shift.reshape(len(index), -1))  # fp32, like the cached keys
        cos = (cos / unscale).view(len(index), heads, n_docs, 1, d)
        sin = (sin / unscale).view(len(index), heads, n_docs, 1, d)
        k_doc = rotate(docs.rot_k[rows].repeat_interleave(r, dim=1), cos, -sin).reshape(len(index), heads, -1, d)
        keys = torch.cat([plain.k[rows].repeat_interleave(r, dim=1), k_doc.to(plain.k.dtype)], dim=2)
        values = torch.cat([plain.v[rows], docs.v[rows].reshape(len(index), kv, -1, d).to(plain.v.dtype)], dim=2)
        q_pos = layout.doc_pos[rows, own]  # [n, L]
        see_plain = layout.plain_valid[rows][:, None] & (layout.plain_pos[rows][:, None] <= q_pos[:, :, None])
        causal = layout.doc_pos[rows][:, None] <= q_pos[:, :, None, None]  # [n, L, K, L']
        other = (torch.arange(n_docs, device=q.device) != own[:, None])[:, None, :, None]
        see_docs = layout.doc_valid[rows][:, None] & (other | causal)
        mask = torch.cat([see_plain, see_docs.reshape(len(index), length, -1)], dim=-1)[:, None]
        outputs.append(F.scaled_dot_product_attention(qd[begin : begin + len(index)], keys,
                                                      values.repeat_interleave(r, dim=1), attn_mask=mask, scale=scaling))
    return torch.cat(outputs).view(b, n_docs, heads, length, d).transpose(1, 2)


def _scatter_tokens(out, values, index, valid):
    """out[:, :, index] = values for the valid slots (others go to a spare last column)."""
    b, heads, n, d = out.shape
    column = torch.where(valid, index, n - 1).reshape(b, 1, -1, 1).expand(b, heads, -1, d)
    out.scatter_(2, column, values.reshape(b, heads, -1, d).to(out.dtype))


def attend(q, q_pos, shift, visible, docs: DocKV, plain: PlainKV, plain_visible, rotary, scaling):
    """Attention output [B, H, T, d] of queries q [B, H, T, d] (un-rotated) at base positions
    q_pos [B, T], documents shifted by ``shift`` [B, H, T, K], document slots ``visible``
    [B, T, K, L], plain keys ``plain_visible`` [B, T, P]."""
    b, heads, t, d = q.shape
    kv, n_docs, length = docs.rot_k.shape[1:4]
    r = heads // kv
    cos, sin = rotary(q, q_pos)
    q_plain = _grouped(rotate(q, cos.unsqueeze(1), sin.unsqueeze(1)), kv).reshape(b, kv, r * t, d)
    pos = _grouped(q_pos[:, None, :, None] + shift, kv).permute(0, 1, 4, 2, 3)  # [B, kv, K, r, T]
    cos, sin = rotary(q, pos.reshape(b, -1))
    cos, sin = cos.view(b, kv, n_docs, r * t, d), sin.view(b, kv, n_docs, r * t, d)
    qg = _grouped(q, kv).reshape(b, kv, 1, r * t, d)
    q_docs = qg * cos + rotate_half(qg) * sin  # [B, kv, K, r*T, d]: one rotated copy per document

    s_docs = _gemm(q_docs, docs.rot_k.transpose(-1, -2), scaling).view(b, kv, n_docs, r, t, length)
    s_docs.masked_fill_(~visible.permute(0, 2, 1, 3)[:, None, :, None], LOW)
    s_plain = _gemm(q_plain, plain.k.transpose(-1, -2), scaling).view(b, kv, r, t, -1)
    s_plain.masked_fill_(~plain_visible[:, None, None], LOW)
    top = torch.maximum(s_plain.amax(-1), s_docs.amax(dim=(2, 5)))  # [B, kv, r, T]
    s_plain.sub_(top[..., None]).exp_()
    s_docs.sub_(top[:, :, None, :, :, None]).exp_()
    denom = s_plain.sum(-1) + s_docs.sum(dim=(2, 5))
    out = _gemm(s_plain.view(b, kv, r * t, -1), plain.v)
    out = out + _gemm(s_docs.view(b, kv, n_docs, r * t, length), docs.v).sum(2)
    out = out.view(b, kv, r, t, -1) / denom[..., None]
    return out.reshape(b, heads, t, -1).to(q.dtype)


def pine_attention(q, docs: DocKV, plain: PlainKV, layout: Layout, rotary, scaling, *, prefill: bool,
                   q_pos=None):
    """One layer's PINE attention output [B, H, T, d] for un-rotated queries q [B, H, T, d].

    ``prefill``: q are the prompt tokens (token-major, as in ``layout``); else generated tokens
    at base positions ``q_pos`` [B, T] (they rank the documents as suffix tokens do).
    """
    b, heads, t, _ = q.shape
    n_docs, length = layout.doc_valid.shape[1:]
    lengths = layout.doc_len.clamp(min=1)[:, None, None, :]
    if prefill:  # document queries in fused blocks; the few plain ones (prefix, suffix) below
        per_doc, per_token = prompt_importance(q, docs, layout, scaling)
        doc_shift = shifts_from_importance(per_doc, layout.doc_len)  # [B, H, K(i), K]
        out = q.new_zeros((b, heads, t + 1, q.shape[-1]))  # + a spare column for padding slots
        _scatter_tokens(out, document_queries(q, docs, plain, layout, rotary, scaling, doc_shift),
                        layout.doc_index, layout.doc_valid)
        q, q_pos = _gather_tokens(q, layout.plain_index), layout.plain_pos
        importance = _gather_tokens(per_token, layout.plain_index)
        t = q.shape[2]
    outputs = []
    step = _per_chunk(t, b * heads * max(n_docs, 1) * max(length, q.shape[-1], 1))
    for begin in range(0, t, step):
        qc, pc = q[:, :, begin : begin + step], q_pos[:, begin : begin + step]
        visible, plain_visible = plain_visibility(layout, pc)
        if prefill:
            shift = shifts_from_importance(importance[:, :, begin : begin + step], layout.doc_len)
        else:
            shift = shifts_from_importance(doc_probabilities(qc, docs, visible, scaling) / lengths, layout.doc_len)
        outputs.append(attend(qc, pc, shift, visible, docs, plain, plain_visible, rotary, scaling))
    if not prefill:
        return torch.cat(outputs, dim=2)
    _scatter_tokens(out, torch.cat(outputs, dim=2), layout.plain_index, layout.plain_valid)
    return out[:, :, :-1]
