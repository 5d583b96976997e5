"""Packed micro-batches: rows concatenated without padding, attention kept within each row.

A padded micro-batch of ~2,400-token rows costs twice over on GPUs without flash-attn:
the MLPs and projections run on the padding, and SDPA gets a padding mask, which rules
out its flash kernel and makes transformers repeat the key/value heads for every query
head. Packing drops both: the real tokens of all rows form one ``[1, T]`` sequence,
positions restart at 0 in each row, and attention runs on each row's span alone
(``cu_seq_lens``, flash-attn's convention: row b is ``[cu[b], cu[b+1])``).

:data:`PACKED_ATTENTION` is the name of an attention implementation registered with
transformers' ``AttentionInterface``: load a model with ``attn_implementation=PACKED_ATTENTION``
(after :func:`register_packed_attention`) and call it through
``kd.losses.response_logits(..., packed=True)``. On CUDA it uses torch's variable-length
flash kernel (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.9); elsewhere (CPU) it
runs causal SDPA on each row's span, which gives the same outputs.
"""

import inspect

import torch
import torch.nn.functional as F

from pos2distill.errors import UserError

PACKED_ATTENTION = "pos2distill_packed"


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The real tokens of a padded ``[batch, seq]`` micro-batch as one ``[1, T]`` sequence.

    Tokens keep their order within a row (any padding layout works: left, right, or
    ``pad_before_tail``'s gap). Returns ``input_ids`` and ``position_ids`` of shape ``[1, T]``,
    ``cu_seq_lens`` (int32, ``[batch + 1]``, leading 0), ``max_length`` (an int) and
    ``ends`` (``[batch]``, the packed index one past each row's last token).
    """
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    if bool((lengths == 0).any()):
        raise UserError("pack_rows: a row without tokens cannot be packed")
    ends = lengths.cumsum(0)
    starts = ends - lengths
    packed = input_ids[keep].unsqueeze(0)
    row_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    positions = torch.arange(packed.shape[1], device=lengths.device) - starts[row_of_token]
    return {
        "input_ids": packed,
        "position_ids": positions.unsqueeze(0),
        "cu_seq_lens": F.pad(ends, (1, 0)).to(torch.int32),
        "max_length": int(lengths.max()),
        "ends": ends,
    }


def response_positions(pack: dict, width: int) -> torch.Tensor:
    """Packed indices of the last ``width + 1`` tokens of every row, row after row (``[batch * (width + 1)]``).

    Slot ``k`` of row b is the output that predicts the row's token ``k + 1`` of those
    ``width + 1``: the response-predicting positions of ``kd.losses.response_logits``.
    """
    offsets = torch.arange(width + 1, device=pack["ends"].device)
    return (pack["ends"][:, None] - (width + 1) + offsets).clamp_min(0).flatten()


class _CallCounter:
    """How many attention layers ran the packed kernel in the current :func:`packed_forward`."""

    calls = 0


@torch.compiler.disable
def _count_packed_call() -> None:
    # Outside any compiled graph: torch 2.11's dynamo replayed the traced increment as a
    # constant store, so 24 compiled layers counted 1 (seen on an H200 with bench_train --compile).
    _CallCounter.calls += 1


def packed_forward(model, pack: dict, **kwargs):
    """``model`` (a causal LM or its decoder) on a :func:`pack_rows` result, rows kept apart by ``cu_seq_lens``.

    Every decoder layer must have run the packed kernel: a layer that mixes tokens some other
    way (another attention implementation, a convolution, a recurrent layer) would see across
    rows, so anything else is an error, not a silent difference.
    """
    _CallCounter.calls = 0
    output = model(
        input_ids=pack["input_ids"],
        position_ids=pack["position_ids"],
        use_cache=False,
        cu_seq_lens_q=pack["cu_seq_lens"],
        cu_seq_lens_k=pack["cu_seq_lens"],
        max_length_q=pack["max_length"],
        max_length_k=pack["max_length"],
        **kwargs,
    )
    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is not None and _CallCounter.calls != layers:
        raise UserError(
            f"packed rows: {_CallCounter.calls} of the model's {layers} layers ran the packed attention "
            f"{PACKED_ATTENTION!r} (is it loaded with it? does it mix tokens outside attention?); train with "
            "PACKING=0 (no --packing_samples)"
        )
    return output


def check_packable(config, max_len: int) -> None:
    """Refuse, before training, models whose token mixing the packed rows cannot keep within a row."""
    other = sorted({t for t in getattr(config, "layer_types", None) or ()
                    if t not in ("full_attention", "sliding_attention")})
    if other:
        raise UserError(f"packed rows: the model has {', '.join(other)} layers, which would mix tokens across "
                        "rows; train with PACKING=0 (no --packing_samples)")
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None and chunk < max_len:
        raise UserError(f"packed rows: the model attends in chunks of {chunk} tokens, fewer than --max_len "
                        f"{max_len}; train with PACKING=0 (no --packing_samples)")


def _varlen_kernel():
    """torch's variable-length flash attention and the keyword names this torch version takes."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_PARAMS = _varlen_kernel()


def _causal_flags() -> dict:
    # torch 2.9-2.10 take is_causal; later versions a (left, right) window, (-1, 0) = causal.
    if "window_size" in _VARLEN_PARAMS:
        return {"window_size": (-1, 0)}
    return {"is_causal": True}


def _varlen_attention(query, key, value, cu_seq_lens, max_length, scaling):
    extra = _causal_flags()
    if "enable_gqa" in _VARLEN_PARAMS:
        extra["enable_gqa"] = True
    if "scale" in _VARLEN_PARAMS:
        extra["scale"] = scaling
    return _VARLEN(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **extra)


def _per_row_attention(query, key, value, cu_seq_lens, scaling):
    """Causal SDPA on each row's span: the reference path, and the one used off CUDA (or on torch < 2.9)."""
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seq_lens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [1, heads, tokens, dim]: SDPA's fused kernels take 4-D inputs only
        q = query[start:end].transpose(0, 1).unsqueeze(0)
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
        outputs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


def varlen_kernel_available() -> bool:
    """Whether this torch has the variable-length flash kernel the packed rows use on CUDA."""
    return _VARLEN is not None


def use_varlen_kernel(query: torch.Tensor, scaling=None) -> bool:
    """CUDA, half precision, and a kernel that can apply this softmax scale (torch 2.9 has no ``scale``)."""
    default_scale = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-9
    return (_VARLEN is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and ("scale" in _VARLEN_PARAMS or default_scale))


def _check_plain_causal(kwargs: dict) -> None:
    """Refuse attention variants this kernel does not compute, rather than silently ignore them."""
    window = kwargs.get("sliding_window")
    if window is not None and window < kwargs["max_length_q"]:
        raise UserError(f"packed rows: the model uses sliding-window attention ({window} tokens, shorter than "
                        f"the longest row, {kwargs['max_length_q']}); train with PACKING=0 (no --packing_samples)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise UserError(f"packed rows: the model's attention uses {name}, which the packed kernel does not "
                            "compute; train with PACKING=0 (no --packing_samples)")


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers attention function for packed rows: ``query [1, heads, T, dim]`` -> ``[1, T, heads, dim]``."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1:
        raise UserError(
            f"attention {PACKED_ATTENTION!r} needs packed rows: call the model through "
            "kd.losses.response_logits(..., packed=True)"
        )
    if dropout:
        raise UserError(f"attention {PACKED_ATTENTION!r} has no dropout (got {dropout}); train with PACKING=0 "
                        "(no --packing_samples)")
    _check_plain_causal(kwargs)
    _count_packed_call()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
    if use_varlen_kernel(q, scaling):
        out = _varlen_attention(q, k, v, cu_seq_lens, kwargs["max_length_q"], scaling)
    else:
        out = _per_row_attention(q, k, v, cu_seq_lens, scaling)
    return out.unsqueeze(0), None


def register_packed_attention() -> str:
    """Register :data:`PACKED_ATTENTION` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    return PACKED_ATTENTION
