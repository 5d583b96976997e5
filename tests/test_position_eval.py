"""evaluate_positions: several positions per generate call, chunked per position, resumable."""

import pytest

from pos2distill.errors import UserError
from pos2distill.position_eval import evaluate_positions
from pos2distill.records import Document, Example
from pos2distill.resumable import ChunkedOutput


class EchoTokenizer:
    chat_template = "plain"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[0]["content"]


class GoldFirstBackend:
    """Answers with the title of the first document of the prompt: right only at position 0."""

    def __init__(self):
        self.tokenizer = EchoTokenizer()
        self.calls = []
        self.counted, self.generated = [], []

    def count_tokens(self, prompts):
        self.counted.append(list(prompts))
        return [len(p.split()) for p in prompts]

    def generate(self, prompts, **kwargs):
        self.calls.append(len(prompts))
        self.generated.append(list(prompts))
        return [p.split("Title: ", 1)[1].split(")", 1)[0].split("\n", 1)[0] for p in prompts]


def examples(n=3, docs=4):
    out = []
    for i in range(n):
        gold = Document(f"answer{i}", f"gold text {i}")
        distractors = [Document(f"other{i}x{j}", f"text {j}") for j in range(docs - 1)]
        out.append(Example(question=f"question {i}?", answers=[f"answer{i}"], gold=gold, distractors=distractors))
    return out


def run(backend, per_call, output=None, positions=(0, 1, 2, 3)):
    return evaluate_positions(backend, examples(), [10, 11, 12], list(positions), seed=1, max_new_tokens=8,
                              max_prompt_length=10_000, output=output, positions_per_call=per_call, log=lambda *_: None)


def test_grouped_calls_give_the_same_records_in_position_order():
    one = GoldFirstBackend()
    records_one, stats_one = run(one, 1)
    grouped = GoldFirstBackend()
    records_grouped, stats_grouped = run(grouped, 3)
    assert one.calls == [3, 3, 3, 3]
    assert grouped.calls == [9, 3]  # positions 0-2 in one call, position 3 in the next
    # the lengths are counted on exactly the prompts of each call (the HF backend reuses their ids)
    assert grouped.counted == grouped.generated
    assert records_grouped == records_one
    assert [r["gold_idx"] for r in records_one] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert [r["correct"] for r in records_one] == [True] * 3 + [False] * 9
    assert stats_one["generated"] == stats_grouped["generated"] == 12


def test_grouped_calls_write_one_chunk_per_position_and_resume(tmp_path):
    path = tmp_path / "predictions.jsonl.gz"
    first = GoldFirstBackend()
    run(first, 2, ChunkedOutput(str(path), {"run": 1}, log=lambda *_: None), positions=(0, 1))
    output = ChunkedOutput(str(path), {"run": 1}, log=lambda *_: None)
    assert output.completed() == [0, 1]
    # a second run over four positions (same config) answers only the two missing ones
    again = GoldFirstBackend()
    records, stats = run(again, 4, output)
    assert again.calls == [6]
    assert stats["generated"] == 6
    assert records == run(GoldFirstBackend(), 1)[0]


def test_positions_per_call_must_be_positive():
    with pytest.raises(UserError, match="positions_per_call"):
        run(GoldFirstBackend(), 0)
