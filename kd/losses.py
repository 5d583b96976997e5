"""Distillation losses on response tokens.

Every loss works on *response-aligned* logits: ``logits[b, t]`` is the distribution
that predicts response token ``t`` of sample ``b``, i.e. the model output at the
position just before that token (see :func:`response_logits`). ``mask[b, t]``
is 1 for real response tokens and 0 for padding. Logits may arrive in bf16; all
math runs in fp32.
"""

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int,
                    packed: bool = False) -> torch.Tensor:
    """Logits that predict the last ``width`` tokens of each row, ``[batch, width, vocab]``.

    Every row ends at position S-1 (padding sits before the response and the last prompt
    token, see ``kd.pair_dataset.pad_before_tail``), so a response of L <= ``width`` tokens
    occupies the last L positions. Token ``S - width + k`` is predicted by the output at
    ``S - width + k - 1``: slot ``k`` of the result is the output at that earlier position.
    Only the last ``width + 1`` positions go through the LM head (``logits_to_keep``), never
    the full ``[batch, seq, vocab]`` tensor. Position ids follow the attention mask.

    ``packed=True`` runs the rows' real tokens as one sequence without padding
    (``kd.packed_attention``; the model must be loaded with its attention implementation,
    else ``packed_forward`` raises): the same logits, the LM head at the same ``width + 1``
    last positions of each row.
    """
    if packed:
        return _packed_response_logits(model, input_ids, attention_mask, width)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    output = model(
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=width + 1,
        use_cache=False,
    )
    return output.logits[:, -(width + 1) : -1]


def _packed_response_logits(model, input_ids, attention_mask, width):
    from .packed_attention import pack_rows, packed_forward, response_positions

    pack = pack_rows(input_ids, attention_mask)
    output = packed_forward(model, pack, logits_to_keep=response_positions(pack, width))
    return output.logits.view(input_ids.shape[0], width + 1, -1)[:, :-1]


def student_teacher_logits(student, teacher, batch: dict, width: int, packed: bool = False) -> tuple:
    """Response logits of the student (with grad) and of the frozen teacher (no grad) for a
    ``PairDataset.collate_fn`` micro-batch: the teacher runs once per distinct input, and
    ``teacher_index`` maps its rows back to the student's."""
    student_logits = response_logits(student, batch["student_input_ids"], batch["student_attention_mask"], width,
                                     packed)
    with torch.no_grad():
        teacher_logits = response_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"], width,
                                         packed)
        if teacher_logits.shape[0] != student_logits.shape[0]:
            teacher_logits = teacher_logits[batch["teacher_index"]]
    return student_logits, teacher_logits


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl_from_log_probs(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) over the last axis, with 0 * log 0 = 0.

    Where the teacher probability is exactly 0 (a -inf logit, or an underflow) the
    term is set to 0 *before* the product, so neither the value nor the gradient
    sees 0 * (-inf) = NaN.
    """
    teacher_p = teacher_logp.exp()
    diff = torch.where(teacher_p > 0, teacher_logp - student_logp, torch.zeros_like(student_logp))
    return (teacher_p * diff).sum(-1)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(teacher || student), shape ``[batch, tokens]``.

    KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)),  p = softmax(teacher / T), q = softmax(student / T).
    """
    return _kl_from_log_probs(_log_probs(teacher_logits.detach(), temperature), _log_probs(student_logits, temperature))


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not multiply: a non-finite value in a padding slot must not leak (NaN * 0 = NaN).
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over masked entries / their count, 0 when the mask is empty."""
    return _masked(values, mask).sum() / mask.float().sum().clamp_min(1.0)


def sample_kl(tok_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL_i = (1 / L_i) sum_t KL_{i,t}, the mean over sample i's response tokens (0 when L_i = 0)."""
    return _masked(tok_kl, mask).sum(-1) / mask.float().sum(-1).clamp_min(1.0)


def kd_loss(tok_kl: torch.Tensor, mask: torch.Tensor, scale: float = 3.0, decay: float = 0.99) -> torch.Tensor:
    """Position-decayed KD: mean_i (1 / L_i) sum_t scale * decay^t * KL_{i,t}.

    ``t`` counts response tokens from 0; samples without response tokens are left out of
    the batch mean.
    """
    mask = mask.float()
    t = (mask.cumsum(-1) - 1).clamp_min(0)
    weighted = sample_kl(tok_kl * scale * decay**t, mask)
    has_tokens = (mask.sum(-1) > 0).float()
    return _masked_mean(weighted, has_tokens)


def lm_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on response tokens, token mean: -(1/N) sum_{b,t} log q_{b,t}(y_{b,t})."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    token_logp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _masked_mean(-token_logp, mask.float())


def rank_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    top_k: int = 20,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Top-k ranking KL, token mean.

    With K = the teacher's ``top_k`` token ids at a position:
    KL_t = sum_{v in K} p'(v) (log p'(v) - log q'(v)), p' = softmax over K of teacher / T,
    q' = softmax over K of student / T (the student's logits at the same ids).
    """
    k = min(top_k, teacher_logits.shape[-1])
    teacher_top, ids = teacher_logits.detach().float().topk(k, dim=-1)
    student_top = student_logits.float().gather(-1, ids)
    tok = _kl_from_log_probs(_log_probs(teacher_top, temperature), _log_probs(student_top, temperature))
    return _masked_mean(tok, mask.float())


def adaptive_weights(kl: torch.Tensor, gold_idx: torch.Tensor, is_anchor: torch.Tensor, perserve: float = 1.0,
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pos2Distill sample weights over a (global) batch; no gradient.

    Anchors: w_i = lambda (``perserve``). Trivial samples are grouped by ``gold_idx``; group p
    has mean KL m_p, c = softmax(m) * (number of groups), and
    w_i = c_p / |p| * KL_i / max_{j in p} KL_j.
    A group whose largest KL is 0 has all KL_j = 0 and contributes nothing: its ratio is
    set to 0 instead of 0/0. ``valid`` (default: all) drops samples without response tokens.
    """
    kl = kl.detach().float().clamp_min(0.0)
    anchor = is_anchor.bool()
    valid = torch.ones_like(anchor) if valid is None else valid.bool()
    weights = torch.zeros_like(kl)
    weights[anchor & valid] = float(perserve)
    trivial = ~anchor & valid
    if not bool(trivial.any()):
        return weights
    groups, member = torch.unique(gold_idx[trivial], return_inverse=True)
    n_groups = groups.numel()
    trivial_kl = kl[trivial]
    sizes = torch.zeros(n_groups, dtype=kl.dtype, device=kl.device).index_add_(0, member, torch.ones_like(trivial_kl))
    means = torch.zeros_like(sizes).index_add_(0, member, trivial_kl) / sizes
    peaks = torch.zeros_like(sizes).scatter_reduce_(0, member, trivial_kl, reduce="amax", include_self=True)
    c = torch.softmax(means, dim=0) * n_groups
    peak = peaks[member]
    ratio = torch.where(peak > 0, trivial_kl / peak.clamp_min(torch.finfo(kl.dtype).tiny), torch.zeros_like(peak))
    weights[trivial] = c[member] / sizes[member] * ratio
    return weights


def _no_gather(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


REFERENCE_MICRO_BATCH = 4  # the reference's layout: 8 GPUs x micro-batch 4, global batch 32


def adaptive_scale(micro_batch_size: int, legacy: bool = False) -> float:
    """Factor s on this rank's sum_i w_i KL_i that makes the gradient independent of the layout.

    DeepSpeed turns the micro-batch losses L_{r,a} of W ranks and A accumulation steps (global
    batch G = W * A * m, micro-batch m) into the gradient g = (1 / (W * A)) sum_{r,a} grad L_{r,a}:
    ``engine.backward`` divides each loss by A and the data-parallel reduction averages over W.
    With L_{r,a} = s * sum_{i in (r,a)} w_i KL_i that is g = (s * m / G) sum_{i in G} w_i grad KL_i.
    The reference (W = 8, A = 1, m = 4, s = 1) has g = (4 / G) sum_i w_i grad KL_i = (1/8) sum over
    its 32 rows, so s = REFERENCE_MICRO_BATCH / m gives the reference's gradient in every layout
    (1 x 32: s = 1/8; 2 GPUs x 16: 1/4; 1 GPU x 8 x 4 accumulation steps: 1/2).
    ``legacy``: s = 1, the scale before issue 16 (8x the reference's gradient at 1 GPU x 32).
    """
    return 1.0 if legacy else REFERENCE_MICRO_BATCH / float(micro_batch_size)


def adaptive_loss(
    tok_kl: torch.Tensor,
    mask: torch.Tensor,
    gold_idx: torch.Tensor,
    is_anchor: torch.Tensor,
    perserve: float = 1.0,
    gather: Gather = _no_gather,
    rank: int = 0,
    scale: float = 1.0,
    weights: Optional[torch.Tensor] = None,
) -> tuple:
    """Pos2Distill loss on this rank: scale * sum_i w_i * KL_i over the local samples.

    KL_i is :func:`sample_kl`; ``scale`` is :func:`adaptive_scale`. The weights are ``weights``
    when given (:func:`adaptive_step_weights`: over all micro-batches of the optimizer step),
    else :func:`adaptive_weights` on this micro-batch over all ranks, built by ``gather``
    (concatenate a tensor over ranks in rank order, equal local sizes) from the detached KL_i,
    ``gold_idx`` and ``is_anchor``. Returns (loss, local weights).
    """
    mask = mask.float()
    kl = sample_kl(tok_kl, mask)
    if weights is None:
        weights = _local_share(
            adaptive_weights(gather(kl.detach().float()), gather(gold_idx.long()), gather(is_anchor.long()), perserve,
                             gather((mask.sum(-1) > 0).long())), kl.shape[0], rank)
    own = weights.to(kl.device)
    return scale * (own * kl).sum(), own


def _local_share(weights: torch.Tensor, local: int, rank: int) -> torch.Tensor:
    return weights[rank * local : (rank + 1) * local]


def adaptive_step_weights(kls: Sequence[torch.Tensor], gold_idx: Sequence[torch.Tensor],
                          is_anchor: Sequence[torch.Tensor], valid: Sequence[torch.Tensor], perserve: float = 1.0,
                          gather: Gather = _no_gather, rank: int = 0) -> list:
    """The weights of this rank's micro-batches of one optimizer step, from :func:`adaptive_weights`
    on the whole global batch (every rank's every micro-batch), so that gradient accumulation
    sees the same groups as one large batch. Per micro-batch a: ``kls[a]`` (KL_i, no gradient),
    ``gold_idx[a]``, ``is_anchor[a]``, ``valid[a]`` (has response tokens); equal sizes on all ranks.
    """
    sizes = [k.shape[0] for k in kls]
    cat = lambda parts, dtype: gather(torch.cat([p.detach().to(dtype) for p in parts]))
    weights = adaptive_weights(cat(kls, torch.float32), cat(gold_idx, torch.long), cat(is_anchor, torch.long),
                               perserve, cat(valid, torch.long))
    return list(_local_share(weights, sum(sizes), rank).split(sizes))


LOSS_NAMES = ("kd", "lm", "rank", "adaptive")


class DistillationLoss(nn.Module):
    """total = a * kd + b * lm + c * rank + d * adaptive, with ``coefs = (a, b, c, d)``.

    Components with a zero coefficient are still computed for logging, without gradient.

    Under DeepSpeed (gradient = mean over ranks and accumulation steps of the micro-batch
    gradients): adaptive is made layout-invariant by ``adaptive_scale`` and step-wide weights
    (:func:`adaptive_scale`); kd is a mean over the micro-batch's samples, hence invariant for
    equal micro-batches whose samples all have response tokens; lm and rank are token means
    per micro-batch, so each micro-batch counts equally whatever its token count - invariant
    only when micro-batches hold equal numbers of response tokens, as in the reference.
    """

    def __init__(self, coefs: Sequence[float], perserve: float = 1.0, temperature: float = 1.0, top_k: int = 20,
                 gather: Gather = _no_gather, rank: int = 0, adaptive_scale: float = 1.0):
        super().__init__()
        self.adaptive_scale = adaptive_scale
        self.coefs = dict(zip(LOSS_NAMES, (float(c) for c in coefs)))
        self.perserve = perserve
        self.temperature = temperature
        self.top_k = top_k
        self.gather = gather
        self.rank = rank

    def sample_kl(self, student_logits, teacher_logits, mask) -> torch.Tensor:
        """KL_i of each sample, no gradient: the statistics behind :func:`adaptive_step_weights`."""
        with torch.no_grad():
            return sample_kl(token_kl(student_logits, teacher_logits, self.temperature), mask.float())

    def forward(self, student_logits, teacher_logits, labels, mask, gold_idx, is_anchor, weights=None) -> dict:
        """The components and ``total``; ``weights``: the adaptive weights of these rows, when
        computed over the whole optimizer step (:func:`adaptive_step_weights`)."""
        mask = mask.float()
        needs_kl = self.coefs["kd"] > 0 or self.coefs["adaptive"] > 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_kl):
            tok_kl = token_kl(student_logits, teacher_logits, self.temperature)
        terms = {
            "kd": lambda: kd_loss(tok_kl, mask),
            "lm": lambda: lm_loss(student_logits, labels, mask),
            "rank": lambda: rank_loss(student_logits, teacher_logits, mask, self.top_k, self.temperature),
            "adaptive": lambda: adaptive_loss(
                tok_kl, mask, gold_idx, is_anchor, self.perserve, self.gather, self.rank, self.adaptive_scale, weights
            )[0],
        }
        out = {}
        total = None
        for name in LOSS_NAMES:
            coef = self.coefs[name]
            with torch.set_grad_enabled(torch.is_grad_enabled() and coef > 0):
                value = terms[name]()
            out[name] = value
            if coef > 0:
                total = coef * value if total is None else total + coef * value
        out["total"] = total
        return out
