"""PINE inference (``--inference pine``): the documents' order cannot change the answer.

PINE (Wang et al., "Eliminating Position Bias of Language Models: A Mechanistic Approach",
ICLR 2025, arXiv 2407.01100) is training-free: documents attend to each other bidirectionally
and each layer/head re-assigns their positions by importance to the query
(``pine_attention`` has the rule and our choices). This module runs a Llama or Qwen2
checkpoint of transformers layer by layer with that attention, batched (rows of different
lengths and document counts, padded), with a KV cache:

- a prompt is tokenized piece by piece (prefix, each document, suffix: a document's tokens
  must not depend on its neighbours), from ``prompting.SegmentedPrompt``;
- prefill: every prompt token through PINE attention; only the last token's logits are kept;
- decoding: a generated token at base position prompt length + step (after every assigned
  position, which all lie below it) ranks the documents as a suffix token does, per layer
  and head, and attends to everything. Cached keys are rotated by their base position and
  document keys are also kept un-rotated (importance), so a step costs about one plain step
  with the documents' keys twice.

Cost: in the prefill, document queries run as fused attention blocks (one per row and document)
and the importance as one fused fp32 attention; the few plain queries and every decoding step
use explicit fp32 GEMMs with the query rotated once per document (``pine_attention``).
benchmarks/bench_pine.py measures prompts/s against plain inference, and
benchmarks/bench_pine_kernel.py the prefill and a decoding step by kernel.
"""

from __future__ import annotations

import contextlib
import time

from .errors import UserError
from .generation.base import GenerationBackend, newline_token_table
from .generation.factory import build_backend
from .generation.hf import HFBackend

INFERENCE = ("plain", "pine")
ARCHITECTURES = ("llama", "qwen2")


def check_inference(inference: str, backend: str, num_gpus, tensor_parallel_size) -> None:
    if inference not in INFERENCE:
        raise UserError(f"--inference must be one of {', '.join(INFERENCE)}, got {inference!r}")
    if inference == "pine" and backend == "vllm":
        raise UserError("--inference pine runs on the hf backend only (vLLM has no PINE attention); use --backend hf")
    if inference == "pine" and ((num_gpus or 0) > 1 or (tensor_parallel_size or 1) > 1):
        raise UserError("--inference pine runs on one device; use --num_gpus 0 or 1")


def resolve_inference(args) -> None:
    """Check ``--inference`` before anything else; PINE makes ``--backend auto`` mean hf."""
    check_inference(args.inference, args.backend, args.num_gpus, args.tensor_parallel_size)
    if args.inference == "pine":
        args.backend = "hf"


def open_backend(config, model: str, *, max_model_len=None, seed: int = 0, need_chat_template: bool = False,
                 compact_finished: bool = False):
    """``build_backend`` of a ``BackendConfig`` for ``plain``; a ``PineBackend`` (hf, one device) for ``pine``."""
    if config.inference == "plain":
        return build_backend(config, model, max_model_len=max_model_len, seed=seed,
                             need_chat_template=need_chat_template, compact_finished=compact_finished)
    check_inference(config.inference, config.backend, config.num_gpus, config.tensor_parallel_size)
    return PineBackend(model, batch_size=config.batch_size, max_model_len=max_model_len, dtype=config.dtype,
                       device="cpu" if config.num_gpus == 0 else None, need_chat_template=need_chat_template,
                       tf32=config.tf32)


def check_architecture(model) -> None:
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"--inference pine supports {', '.join(ARCHITECTURES)} models, not {config.model_type!r}")
    if getattr(config, "use_sliding_window", False):
        raise UserError("--inference pine: sliding-window attention is not supported (use_sliding_window in config)")


def segment_ids(tokenizer, prompt) -> tuple[list[int], list[list[int]], list[int]]:
    """(prefix, documents, suffix) token ids of a ``SegmentedPrompt``, each piece tokenized alone."""
    segments = getattr(prompt, "segments", None)
    if not segments:
        raise UserError("--inference pine needs prompts with document segments (the QA prompt; KV prompts have none)")
    prefix, *docs, suffix = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in segments]
    return prefix, docs, suffix


def build_layout(rows, device, pad_id: int):
    """Right-padded input ids [B, N] and the ``Layout`` of rows (prefix, documents, suffix)."""
    import torch

    from .pine_attention import Layout

    lengths = [len(p) + sum(map(len, d)) + len(s) for p, d, s in rows]
    width, n_docs = max(lengths), max(1, max(len(d) for _, d, _ in rows))
    doc_width = max([len(x) for _, d, _ in rows for x in d] + [1])
    plain_width = max(len(p) + len(s) for p, _, s in rows) or 1
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    doc_index, doc_pos = torch.zeros((b, n_docs, doc_width), dtype=torch.long), torch.zeros((b, n_docs, doc_width), dtype=torch.long)
    doc_valid, doc_len = torch.zeros((b, n_docs, doc_width), dtype=torch.bool), torch.zeros((b, n_docs), dtype=torch.long)
    plain_index, plain_pos = torch.zeros((b, plain_width), dtype=torch.long), torch.zeros((b, plain_width), dtype=torch.long)
    plain_valid = torch.zeros((b, plain_width), dtype=torch.bool)
    query_doc, query_pos = torch.full((b, width), -1, dtype=torch.long), torch.zeros((b, width), dtype=torch.long)
    for row, (prefix, docs, suffix) in enumerate(rows):
        tokens = prefix + [t for d in docs for t in d] + suffix
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        a = len(prefix)
        end = a + sum(map(len, docs))  # b in pine_attention's notation
        plain = list(range(a)) + list(range(end, end + len(suffix)))
        plain_index[row, : len(plain)] = torch.tensor(plain, dtype=torch.long)
        plain_pos[row, : len(plain)] = torch.tensor(plain, dtype=torch.long)
        plain_valid[row, : len(plain)] = True
        query_pos[row, : len(tokens)] = torch.arange(len(tokens))
        start = a
        for j, doc in enumerate(docs):
            n = len(doc)
            doc_index[row, j, :n] = torch.arange(start, start + n)
            doc_pos[row, j, :n] = torch.arange(end - n, end)  # end-packed
            doc_valid[row, j, :n] = True
            doc_len[row, j] = n
            query_doc[row, start : start + n] = j
            query_pos[row, start : start + n] = torch.arange(end - n, end)
            start += n
    layout = Layout(doc_index, doc_valid, doc_len, doc_pos, plain_index, plain_valid, plain_pos, query_doc, query_pos,
                    torch.tensor(lengths, dtype=torch.long), torch.tensor([len(p) for p, _, _ in rows], dtype=torch.long))
    for field in layout.__dataclass_fields__:
        setattr(layout, field, getattr(layout, field).to(device))
    return ids.to(device), layout


def _qkv(attn, x):
    shape = (*x.shape[:-1], -1, attn.head_dim)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def _layer(layer, hidden, attention):
    """One decoder layer (Llama/Qwen2 layout) with ``attention(attn, q, k, v) -> [B, H, T, d]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    out = attention(attn, *_qkv(attn, x))
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _logits(model, hidden):
    return model.lm_head(model.model.norm(hidden)).float()


def prefill(model, input_ids, layout):
    """(last-token logits [B, V] fp32, per-layer caches) of the prompts."""
    import torch

    from .pine_attention import pine_attention, prefill_cache

    base = model.model
    rotary = base.rotary_emb
    caches = []

    def attention(attn, q, k, v):
        docs, plain = prefill_cache(k, v, layout, rotary)
        caches.append((docs, plain))
        return pine_attention(q, docs, plain, layout, rotary, attn.scaling, prefill=True)

    hidden = base.embed_tokens(input_ids)
    for layer in base.layers:
        hidden = _layer(layer, hidden, attention)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), layout.lengths - 1]
    return _logits(model, last), caches


def decode_step(model, tokens, positions, layout, caches):
    """Logits [B, V] of one new token per row at base ``positions`` [B]; grows caches and layout."""
    import torch

    from .pine_attention import PlainKV, pine_attention, rotate

    base = model.model
    rotary = base.rotary_emb
    q_pos = positions[:, None]
    layout.plain_pos = torch.cat([layout.plain_pos, q_pos], dim=1)
    layout.plain_valid = torch.cat([layout.plain_valid, torch.ones_like(q_pos, dtype=torch.bool)], dim=1)
    layers = iter(range(len(caches)))

    def attention(attn, q, k, v):
        index = next(layers)
        docs, plain = caches[index]
        cos, sin = rotary(k, q_pos)
        plain = PlainKV(torch.cat([plain.k, rotate(k, cos.unsqueeze(1), sin.unsqueeze(1))], dim=2),
                        torch.cat([plain.v, v], dim=2))
        caches[index] = (docs, plain)
        return pine_attention(q, docs, plain, layout, rotary, attn.scaling, prefill=False, q_pos=q_pos)

    hidden = base.embed_tokens(tokens[:, None])
    for layer in base.layers:
        hidden = _layer(layer, hidden, attention)
    return _logits(model, hidden[:, -1])


def _next_tokens(logits, temperature: float, top_p: float, generator):
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pine_generate(model, rows, *, max_new_tokens: int, eos_ids, pad_id: int, temperature: float = 0.0,
                  top_p: float = 1.0, generator=None, newline_table=None, timings=None) -> tuple[list[list[int]], int]:
    """Generated ids per row (up to and including its EOS or newline stop) and decode steps run.

    ``newline_table``: ``generation.base.newline_token_table`` on the device, for the newline stop
    (a newline after some non-whitespace text ends a row, as in ``HFBackend``). ``timings``: a dict
    whose ``prefill_s`` grows by this batch's prompt pass (seconds, the device synchronised).
    """
    with half_inputs_on_tf32(model):
        return _generate(model, rows, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                         temperature=temperature, top_p=top_p, generator=generator, newline_table=newline_table,
                         timings=timings)


@contextlib.contextmanager
def half_inputs_on_tf32(model):
    """TF32 for PINE's fp32 GEMMs while a bf16/fp16 model runs on a GPU: the score GEMMs' inputs
    are half-precision values, which TF32 holds exactly; the probabilities of the value GEMMs are
    rounded to TF32's 10 mantissa bits (bf16 SDPA keeps 7). fp32 models keep full fp32."""
    import torch

    parameter = next(model.parameters())
    if parameter.device.type != "cuda" or parameter.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _generate(model, rows, *, max_new_tokens, eos_ids, pad_id, temperature, top_p, generator, newline_table, timings):
    import torch

    device = next(model.parameters()).device
    began = time.perf_counter()
    input_ids, layout = build_layout(rows, device, pad_id)
    logits, caches = prefill(model, input_ids, layout)
    if timings is not None:  # where the time goes: one synchronisation per batch
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + time.perf_counter() - began
    eos = torch.tensor(list(eos_ids), device=device)
    b = len(rows)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    seen = torch.zeros(b, dtype=torch.bool, device=device)
    stop = torch.full((b,), -1, dtype=torch.long, device=device)  # index of the token that ended a row
    out, steps = [], 0
    while True:
        token = _next_tokens(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token)
        finished = torch.isin(token, eos)
        if newline_table is not None:
            has_newline, content_before, has_content = newline_table
            finished |= has_newline[token] & (seen | content_before[token])
            seen |= has_content[token]
        stop = torch.where(finished & ~done, steps, stop)
        done = done | finished
        steps += 1
        if steps >= max_new_tokens or bool(done.all()):
            break
        logits = decode_step(model, token, layout.lengths + steps - 1, layout, caches)
    generated = torch.stack(out, dim=1).tolist()
    ends = torch.where(stop >= 0, stop + 1, steps).tolist()
    return [ids[:end] for ids, end in zip(generated, ends)], steps


class PineBackend(GenerationBackend):
    """The hf backend's model and tokenizer (``HFBackend``: dtype, device, EOS ids), answering
    ``SegmentedPrompt`` prompts with ``pine_generate`` in batches sorted longest first."""

    name = "hf+pine"

    def __init__(self, path: str, *, batch_size: int = 16, max_model_len=None, dtype: str = "auto", device=None,
                 need_chat_template: bool = False, tf32: bool = False, show_progress: bool = True):
        super().__init__()
        self._hf = HFBackend(path, batch_size=batch_size, max_model_len=max_model_len, dtype=dtype, device=device,
                             need_chat_template=need_chat_template, show_progress=show_progress, tf32=tf32)
        check_architecture(self._hf.model)
        self.tokenizer = self._hf.tokenizer
        self.batch_size, self.max_model_len, self.show_progress = batch_size, max_model_len, show_progress
        self._table = None

    def _rows(self, prompts):
        return [segment_ids(self.tokenizer, p) for p in prompts]

    def count_tokens(self, prompts):
        return [len(p) + sum(map(len, d)) + len(s) for p, d, s in self._rows(prompts)]

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop_at_newline=False,
                 desc="generating (PINE)"):
        import torch
        from tqdm.auto import tqdm

        self._check_sampling(max_new_tokens, temperature, top_p)
        start = time.perf_counter()
        rows = self._rows(prompts)
        lengths = [len(p) + sum(map(len, d)) + len(s) for p, d, s in rows]
        if self.max_model_len is not None and lengths and max(lengths) > self.max_model_len:
            raise UserError(f"a prompt has {max(lengths)} tokens, more than --max_model_len {self.max_model_len}")
        hf = self._hf
        if stop_at_newline and self._table is None:
            vocab = hf.model.get_output_embeddings().weight.shape[0]
            self._table = tuple(t.to(hf.device) for t in newline_token_table(self.tokenizer, vocab))
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        answers, new_tokens, timings = [None] * len(rows), 0, {}
        generator = torch.Generator(device=hf.device).manual_seed(seed)
        with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="prompt", dynamic_ncols=True,
                                          disable=not self.show_progress) as bar:
            for begin in range(0, len(order), self.batch_size):
                batch = order[begin : begin + self.batch_size]
                try:
                    ids, _ = pine_generate(hf.model, [rows[i] for i in batch], max_new_tokens=max_new_tokens,
                                           eos_ids=hf.eos_ids, pad_id=hf.pad_id, temperature=temperature, top_p=top_p,
                                           generator=generator, newline_table=self._table if stop_at_newline else None,
                                           timings=timings)
                except torch.OutOfMemoryError as err:
                    raise UserError(f"out of memory in PINE generation of {len(batch)} prompts; lower --batch_size "
                                    f"(now {self.batch_size})") from err
                for i, text in zip(batch, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                    answers[i] = text
                new_tokens += sum(map(len, ids))
                bar.update(len(batch))
        self._record(len(rows), time.perf_counter() - start, new_tokens)
        self.last_stats["prefill_seconds"] = round(timings.get("prefill_s", 0.0), 3)  # the rest: decoding, tokenizing
        return answers

    def close(self) -> None:
        self._hf.close()
