"""The Hugging Face backend: ``AutoModelForCausalLM.generate`` in batches sorted longest first."""

from __future__ import annotations

import contextlib
import warnings

from ..errors import UserError
from .base import GenerationBackend, check_model_len, load_backend_tokenizer, newline_stopper, newline_token_table
from .compaction import generate_compacting


def left_padded(token_ids: list[list[int]], pad_id: int, width: int, device):
    """(input_ids, attention_mask) of shape [rows, width] on ``device``, padded on the left so
    that every prompt ends at the same column (where generation continues)."""
    import torch

    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


@contextlib.contextmanager
def _quiet_generation():
    """Silence transformers' advisory warnings about generation flags during our calls."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)


class HFBackend(GenerationBackend):
    """``AutoModelForCausalLM.generate`` in batches of prompts sorted longest first.

    Longest-first sorting keeps padding low and shows an out-of-memory at the
    first batch. Left padding, SDPA attention, bf16 on CUDA / fp32 on CPU for
    ``dtype="auto"``. The checkpoint's own generation_config is replaced by a
    neutral one (keeping its EOS ids), so only the arguments of ``generate``
    decide how text is sampled.

    ``compact_finished`` (greedy only; sampling is unaffected): a batch's finished rows are
    dropped as it goes (``compaction.generate_compacting``); the same answers, up to the
    rounding of other batch shapes on GPUs.
    """

    name = "hf"

    def __init__(self, path: str, *, batch_size: int = 16, max_model_len: int | None = None,
                 dtype: str = "auto", device: str | None = None, need_chat_template: bool = False,
                 compact_finished: bool = False, show_progress: bool = True, tf32: bool = False):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.batch_size = batch_size
        self.show_progress = show_progress
        self.max_model_len = max_model_len
        self.compact_finished = compact_finished
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        if tf32:  # BackendConfig's check_precision allows it with float32 weights only
            # process-wide, as the setting is: this process generates with this one model
            torch.backends.cuda.matmul.allow_tf32 = True
        self.tokenizer = load_backend_tokenizer(path, need_chat_template)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise UserError(f"{path}: tokenizer has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()

        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self._newline_table = None

    def _eos_ids(self) -> list[int]:
        # Chat models often end turns with a token other than the tokenizer's EOS
        # (Llama-3: <|eot_id|>); the checkpoint's generation_config lists them all.
        ids = []
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        ids.append(self.tokenizer.eos_token_id)
        unique = []
        for i in ids:
            if i is not None and i not in unique:
                unique.append(int(i))
        if not unique:
            raise UserError("the model defines no EOS token; cannot tell where an answer ends")
        return unique

    def _table(self):
        if self._newline_table is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._newline_table = tuple(t.to(self.device) for t in newline_token_table(self.tokenizer, vocab))
        return self._newline_table

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            bos_token_id=self.tokenizer.bos_token_id,
            num_beams=1,
            repetition_penalty=1.0,
        )
        if temperature == 0:
            return GenerationConfig(do_sample=False, **common)
        # top_k=0 disables HF's default top-k of 50, matching vLLM (no top-k).
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)

    def _generate_ids(self, token_ids, *, max_new_tokens, temperature, top_p, seed, stop_at_newline, desc):
        import torch

        from ..progress import progress_bar

        check_model_len(token_ids, self.max_model_len)
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        config = self._generation_config(max_new_tokens, temperature, top_p)

        outputs: list[str | None] = [None] * len(token_ids)
        new_tokens = 0
        devices = [self.device] if self.device.type == "cuda" else []
        bar = progress_bar(total=len(token_ids), desc=desc, unit="prompt", dynamic_ncols=True, disable=not self.show_progress)
        try:
            # fork_rng: seeding must not disturb the caller's global RNG stream.
            with torch.random.fork_rng(devices=devices), torch.inference_mode(), _quiet_generation():
                torch.manual_seed(seed)
                for begin in range(0, len(order), self.batch_size):
                    rows = order[begin : begin + self.batch_size]
                    texts, count = self._generate_batch([token_ids[i] for i in rows], config, stop_at_newline)
                    for i, text in zip(rows, texts):
                        outputs[i] = text
                    new_tokens += count
                    bar.update(len(rows))
        finally:
            bar.close()
        return outputs, new_tokens

    def _generate_batch(self, batch_ids, config, stop_at_newline: bool):
        import torch

        width = max(len(ids) for ids in batch_ids)
        input_ids, attention = left_padded(batch_ids, self.pad_id, width, self.device)
        try:
            if self.compact_finished and not config.do_sample:
                answers = generate_compacting(self.model, input_ids, attention, config, eos_ids=self.eos_ids,
                                              table=self._table() if stop_at_newline else None)
            else:
                stopper = newline_stopper(self._table(), width) if stop_at_newline else None
                generated = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    generation_config=config,
                    stopping_criteria=_stopping_list(stopper),
                )
                new = generated[:, width:]
                lengths = self._valid_lengths(new, stopper)
                answers = [ids[:length] for ids, length in zip(new.tolist(), lengths)]
        except torch.OutOfMemoryError as err:
            raise UserError(
                f"out of memory generating {len(batch_ids)} prompts of up to {width} tokens; "
                f"lower --batch_size (now {self.batch_size})"
            ) from err
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return texts, sum(len(ids) for ids in answers)

    def _valid_lengths(self, new, stopper) -> list[int]:
        """Generated tokens per row up to and including its EOS or newline stop.

        Finished rows are filled with the pad token afterwards; cutting them here
        keeps a pad token that is not "special" out of the text.
        """
        import torch

        steps = new.shape[1]
        is_eos = torch.isin(new, torch.tensor(self.eos_ids, device=new.device))
        first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, steps)
        if stopper is not None and stopper.stop_step is not None:
            stop = torch.where(stopper.stop_step >= 0, stopper.stop_step + 1, steps)
            first_eos = torch.minimum(first_eos, stop)
        return first_eos.tolist()

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        self.model = None
        del model
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stopping_list(stopper):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([stopper]) if stopper is not None else None
