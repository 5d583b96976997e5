"""The backend interface, and the newline stop shared by the Hugging Face backends (and PINE)."""

from __future__ import annotations

import functools
import time

from ..errors import UserError
from ..models import load_tokenizer
from ..prompting import require_chat_template


def load_backend_tokenizer(path: str, need_chat_template: bool):
    tokenizer = load_tokenizer(path)
    if need_chat_template:
        require_chat_template(tokenizer)
    return tokenizer


def check_model_len(token_ids: list[list[int]], max_model_len: int | None) -> None:
    """A prompt longer than ``max_model_len`` tokens is an error (numbered as the caller gave it)."""
    if max_model_len is None or not token_ids:
        return
    longest = max(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    if len(token_ids[longest]) > max_model_len:
        raise UserError(f"prompt {longest} has {len(token_ids[longest])} tokens, more than --max_model_len {max_model_len}")


class GenerationBackend:
    """What the stage scripts use; see the package docstring."""

    name: str = ""
    tokenizer = None

    def __init__(self):
        self.last_stats: dict = {}
        self._encoded = None  # (prompts, token ids) of the last count_tokens call

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Prompt lengths in tokens (prompts are chat-templated already: no special tokens added)."""
        prompts = list(prompts)
        ids = self._token_ids(prompts)
        # Stages 1 and 4 count the prompts, then generate the same ones: keep the ids for that call.
        self._encoded = (prompts, ids)
        return [len(i) for i in ids]

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            return []
        if self._encoded is not None and self._encoded[0] == prompts:
            return self._encoded[1]
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_at_newline: bool = False,
        desc: str = "generating",
    ) -> list[str]:
        self._check_sampling(max_new_tokens, temperature, top_p)
        prompts = list(prompts)
        start = time.perf_counter()
        if not prompts:
            self._record(0, 0.0, 0)
            return []
        token_ids = self._token_ids(prompts)
        self._encoded = None
        texts, new_tokens = self._generate_ids(
            token_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop_at_newline=stop_at_newline, desc=desc,
        )
        if len(texts) != len(prompts):  # callers zip answers with prompts; a short list would misalign them
            raise RuntimeError(f"{self.name} backend answered {len(texts)} of {len(prompts)} prompts")
        self._record(len(prompts), time.perf_counter() - start, new_tokens)
        return texts

    def _generate_ids(self, token_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                      seed: int, stop_at_newline: bool, desc: str) -> tuple[list[str], int]:
        """(answers in input order, new tokens generated) for tokenized prompts."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_sampling(self, max_new_tokens: int, temperature: float, top_p: float) -> None:
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")

    def _record(self, prompts: int, seconds: float, new_tokens: int) -> None:
        seconds = max(seconds, 1e-9)
        self.last_stats = {
            "prompts": prompts,
            "seconds": seconds,
            "prompts_per_s": prompts / seconds,
            "new_tokens": new_tokens,
            "new_tokens_per_s": new_tokens / seconds,
        }


# --------------------------------------------------------------------------- the newline stop


def newline_token_table(tokenizer, vocab_size: int | None = None):
    """Per-token flags for the newline stop, as three bool tensors of ``vocab_size``.

    ``has_newline``: the token's text contains "\\n"; ``content_before_newline``: it
    has non-whitespace text before its first "\\n"; ``has_content``: it has any
    non-whitespace text. Special tokens count as empty (they are stripped from outputs).
    """
    import torch

    size = max(vocab_size or 0, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    padding = [False] * (size - len(texts))  # ids the model has but the tokenizer never produces
    cuts = [text.find("\n") for text in texts]
    has_newline = torch.tensor([cut >= 0 for cut in cuts] + padding, dtype=torch.bool)
    content_before = torch.tensor(
        [cut > 0 and bool(text[:cut].strip()) for text, cut in zip(texts, cuts)] + padding, dtype=torch.bool
    )
    has_content = torch.tensor([bool(text.strip()) for text in texts] + padding, dtype=torch.bool)
    return has_newline, content_before, has_content


def newline_stopper(table, prompt_width: int, seen_content=None):
    """A StoppingCriteria for one ``generate`` call on left-padded prompts ``prompt_width`` wide.

    ``table`` is ``newline_token_table(...)`` (on the model's device). ``seen_content``
    (bool per row) carries the state of rows that already generated text in an earlier call.
    """
    return newline_stopper_class()(table, prompt_width, seen_content)


@functools.lru_cache(maxsize=None)
def newline_stopper_class():
    # Built lazily: the base class lives in transformers, which this package imports late.
    from transformers import StoppingCriteria

    class NewlineAfterContent(StoppingCriteria):
        """Stops a row once it has produced a newline after some non-whitespace text.

        Looks only at the newest token of each row (O(batch) per step, no host sync)
        and keeps per-row state; one instance per ``generate`` call. ``stop_step``
        holds, per row, the index of the generated token that stopped it (-1: none).
        """

        def __init__(self, table, prompt_width: int, seen_content=None):
            self.has_newline, self.content_before, self.has_content = table
            self.prompt_width = prompt_width
            self.seen_content = None if seen_content is None else seen_content.clone()
            self.stop_step = None

        def __call__(self, input_ids, scores=None, **kwargs):
            import torch

            last = input_ids[:, -1]
            if self.stop_step is None:
                batch = input_ids.shape[0]
                if self.seen_content is None:
                    self.seen_content = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
                self.stop_step = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
            newline = self.has_newline[last]
            done = newline & (self.seen_content | self.content_before[last])
            self.seen_content |= self.has_content[last]
            step = input_ids.shape[1] - self.prompt_width - 1
            self.stop_step = torch.where(done & (self.stop_step < 0), step, self.stop_step)
            return done

    return NewlineAfterContent
