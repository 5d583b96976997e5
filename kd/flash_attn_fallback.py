"""Pure-torch stand-ins for the two flash-attn modules OpenRLHF imports at load time.

``openrlhf.models.ring_attn_utils`` does, at import,
``from flash_attn.bert_padding import index_first_axis, pad_input, rearrange, unpad_input``
and ``from flash_attn.utils.distributed import all_gather``. Those helpers only
matter for packed samples and ring attention, which this project does not use,
but the import alone breaks every OpenRLHF entry point where flash-attn is not
installed (CPU machines, or GPU machines without a matching wheel).

:func:`import_openrlhf` imports OpenRLHF with the stand-ins registered in
``sys.modules`` only while that one module loads, and only when
``importlib.util.find_spec("flash_attn")`` finds nothing. Afterwards the entries
are removed again, so transformers and anything else still see flash-attn as
absent (``find_spec`` returns None) and pick SDPA.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager

import torch
import torch.distributed as dist

_OPENRLHF_MODULE = "openrlhf.models.ring_attn_utils"


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[indices]`` along dim 0 (differentiable)."""
    return x.index_select(0, indices.reshape(-1).long())


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """Pack the real tokens of a (batch, seq, ...) tensor into (tokens, ...).

    Returns ``(packed, indices, cu_seqlens, max_seqlen, seqused)`` like flash-attn 2.7:
    indices into the flattened (batch*seq) axis, int32 cumulative lengths with a
    leading 0, the longest length, and the per-row count of attended tokens.
    """
    attended = attention_mask.bool()
    kept = attended if unused_mask is None else attended | unused_mask.bool()
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    indices = kept.flatten().nonzero(as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, attended.sum(-1, dtype=torch.int32)


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter packed rows into zeros of shape (batch, seq, ...)."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_copy(0, indices.reshape(-1).long(), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


def rearrange(tensor: torch.Tensor, pattern: str, **axes) -> torch.Tensor:
    """einops.rearrange when einops is installed; otherwise only the flattening OpenRLHF uses."""
    try:
        from einops import rearrange as einops_rearrange
    except ImportError:
        if pattern.replace(" ", "") == "bs...->(bs)..." and not axes:
            return tensor.reshape(-1, *tensor.shape[2:])
        raise NotImplementedError(f"rearrange pattern {pattern!r} needs the einops package")
    return einops_rearrange(tensor, pattern, **axes)


class _GatherDim0(torch.autograd.Function):
    """Concatenate equal-shaped tensors from all ranks along dim 0; backward returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    return _GatherDim0.apply(tensor, group)


def _module(name: str, is_package: bool, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    # A spec without an origin and no __file__/__version__: tools that probe the
    # module (transformers' package checks) treat it as not installed.
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
    if is_package:
        module.__path__ = []
    module.__dict__.update(attrs)
    return module


def _stand_ins() -> dict:
    return {
        "flash_attn": _module("flash_attn", True),
        "flash_attn.bert_padding": _module(
            "flash_attn.bert_padding",
            False,
            index_first_axis=index_first_axis,
            pad_input=pad_input,
            rearrange=rearrange,
            unpad_input=unpad_input,
        ),
        "flash_attn.utils": _module("flash_attn.utils", True),
        "flash_attn.utils.distributed": _module("flash_attn.utils.distributed", False, all_gather=all_gather),
    }


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@contextmanager
def _registered(modules: dict):
    missing = [name for name in modules if name not in sys.modules]
    sys.modules.update({name: modules[name] for name in missing})
    try:
        yield
    finally:
        for name in missing:
            sys.modules.pop(name, None)


def import_openrlhf() -> None:
    """Import OpenRLHF's flash-attn dependent module, with stand-ins when flash-attn is absent.

    Call before the first ``openrlhf`` import; later calls are no-ops.
    """
    if _OPENRLHF_MODULE in sys.modules or flash_attn_installed():
        return
    with _registered(_stand_ins()):
        importlib.import_module(_OPENRLHF_MODULE)
