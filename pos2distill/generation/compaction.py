"""Greedy HF generation that drops finished rows from a batch (``HFBackend(compact_finished=True)``).

Plain ``generate`` computes every row of a batch until its slowest row ends, the finished rows
producing padding. Here a call ends once ``COMPACT_FRACTION`` of its rows have finished (EOS or
the newline stop), those rows are dropped, and ``generate`` continues the others from their KV
cache, through the cache's ``reorder_cache`` (the beam-search hook that keeps selected rows).
"""

from __future__ import annotations

import copy
import functools
import math

from .base import newline_stopper_class

# A generate call ends, and its finished rows are dropped, once this fraction of its rows has finished.
COMPACT_FRACTION = 0.25


@functools.lru_cache(maxsize=None)
def rows_finished_class():
    from transformers import StoppingCriteria

    newline_class = newline_stopper_class()

    class RowsFinished(StoppingCriteria):
        """Per-row end of an answer (an EOS id, or with ``table`` the newline stop).

        ``finish_step`` holds, per row, the index of the generated token that ended it (-1:
        running). Once ``fraction`` of the rows have ended, every row reports done, so
        ``generate`` returns and the caller can drop the finished rows. No host sync per step.
        """

        def __init__(self, table, prompt_width: int, eos, seen_content, fraction: float):
            self.newline = newline_class(table, prompt_width, seen_content) if table is not None else None
            self.prompt_width = prompt_width
            self.eos = eos
            self.fraction = fraction
            self.finish_step = None
            self.needed = None

        @property
        def seen_content(self):
            return None if self.newline is None else self.newline.seen_content

        def __call__(self, input_ids, scores=None, **kwargs):
            import torch

            done = torch.isin(input_ids[:, -1], self.eos)
            if self.newline is not None:
                done = done | self.newline(input_ids, scores)
            if self.finish_step is None:
                batch = input_ids.shape[0]
                self.finish_step = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
                self.needed = max(1, math.ceil(self.fraction * batch))
            step = input_ids.shape[1] - self.prompt_width - 1
            self.finish_step = torch.where(done & (self.finish_step < 0), step, self.finish_step)
            finished = self.finish_step >= 0
            return finished | (finished.sum() >= self.needed)

    return RowsFinished


@functools.lru_cache(maxsize=None)
def cache_name() -> str:
    """The name of ``generate``'s KV-cache argument and output field: ``cache`` from transformers
    5.24 (``past_key_values`` warns there and goes in 6.0); 5.23 knows only ``past_key_values``."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {field.name for field in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return "cache" if "cache" in names else "past_key_values"


def generate_compacting(model, input_ids, attention, config, *, eos_ids: list[int], table=None) -> list[list[int]]:
    """Greedy generation of one left-padded batch that drops finished rows as it goes.

    Every call of ``generate`` after the first continues the remaining rows from the
    returned KV cache: their full token sequences and attention mask go in, the cache
    holds all but the last token, so ``generate`` feeds exactly the token an
    uninterrupted call would feed next. Each row gets the same inputs as in one
    uninterrupted call; only the batch shape changes, which on GPUs can change the
    kernels' rounding (as a different batch size can). ``table``: the newline stop's
    ``newline_token_table`` (None: EOS only). Returns the generated ids per row up to and
    including its EOS or newline stop.
    """
    import torch
    from transformers import StoppingCriteriaList

    width = input_ids.shape[1]
    budget = config.max_new_tokens
    eos = torch.tensor(eos_ids, device=input_ids.device)
    active = list(range(input_ids.shape[0]))  # original row of each row of the current batch
    answers = [None] * len(active)
    sequences, mask, cache, seen = input_ids, attention, None, None
    produced = 0
    while True:
        stop = rows_finished_class()(table, width, eos, seen, COMPACT_FRACTION)
        segment = copy.deepcopy(config)
        segment.max_new_tokens = budget - produced
        segment.return_dict_in_generate = True
        out = model.generate(input_ids=sequences, attention_mask=mask, **{cache_name(): cache},
                             generation_config=segment, stopping_criteria=StoppingCriteriaList([stop]))
        steps = out.sequences.shape[1] - sequences.shape[1]
        produced += steps
        finish = stop.finish_step.tolist()
        generated = out.sequences[:, width:].tolist()
        keep = []
        for row, original in enumerate(active):
            if finish[row] >= 0:
                answers[original] = generated[row][: finish[row] + 1]
            elif produced >= budget:
                answers[original] = generated[row]
            else:
                keep.append(row)
        if not keep:
            return answers
        index = torch.tensor(keep, device=input_ids.device)
        sequences = out.sequences.index_select(0, index)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], steps))], dim=1).index_select(0, index)
        cache = getattr(out, cache_name())
        cache.reorder_cache(index)  # the beam-search API: keeps the selected rows
        seen = None if stop.seen_content is None else stop.seen_content.index_select(0, index)
        active = [active[row] for row in keep]
        del out
