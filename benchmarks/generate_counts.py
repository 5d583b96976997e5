"""What a Hugging Face model's ``generate`` computes, counted from outside the backend.

``GenerateCounter(model)`` wraps the model's ``generate`` while in a ``with`` block and sums,
over its calls:

- ``batches``: calls that start a batch (no KV cache given; compaction continues a batch from one),
- ``prompt_tokens`` / ``padded_prompt_tokens``: real / padded prompt tokens of those calls,
- ``decode_steps``: tokens generated per row, summed over calls (a batch's steps),
- ``row_steps``: rows x steps, finished rows included: ``new_tokens / row_steps`` is the useful
  share of decoding (``HFBackend(compact_finished=True)`` lowers the waste).
"""

COUNTS = ("batches", "prompt_tokens", "padded_prompt_tokens", "decode_steps", "row_steps")
CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 / 5.23


class GenerateCounter:
    """``with GenerateCounter(model) as counter: ...``: ``counter.totals`` counts the calls made inside."""

    def __init__(self, model):
        self.model = model
        self.totals = dict.fromkeys(COUNTS, 0)
        self._generate = None

    def __enter__(self):
        self._generate = self.model.generate
        self.model.generate = self._counted  # an instance attribute over the method
        return self

    def __exit__(self, *exc):
        del self.model.generate

    def _counted(self, *args, input_ids, attention_mask, **kwargs):
        out = self._generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        sequences = getattr(out, "sequences", out)  # a tensor, or an output with return_dict_in_generate
        steps = sequences.shape[1] - input_ids.shape[1]
        if all(kwargs.get(name) is None for name in CACHE_ARGUMENTS):
            self.totals["batches"] += 1
            self.totals["prompt_tokens"] += int(attention_mask.sum())
            self.totals["padded_prompt_tokens"] += input_ids.numel()
        self.totals["decode_steps"] += steps
        self.totals["row_steps"] += steps * input_ids.shape[0]
        return out
