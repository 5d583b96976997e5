"""Asking a model the same questions with the gold document at chosen positions.

Shared by stage 1 (answers at the advantageous position, and ``--gold_doc auto``)
and stage 4 (accuracy at every position). For one example the distractor order
is the same at every position (seeded by example id), so positions differ only
in where the gold document sits.
"""

import time
from dataclasses import dataclass

from .errors import UserError
from .metrics import first_line, score_prediction
from .positions import example_rng, place_gold, shuffled
from .prompting import R1_INSTRUCTION, segmented_chat_prompt
from .records import Example
from .resumable import ChunkedOutput


@dataclass
class PromptedExample:
    example_id: int
    example: Example
    position: int
    distractors: list  # the shuffled order used
    documents: list  # the order shown
    prompt: str  # chat-templated


def arrange(example: Example, example_id: int, position: int, seed: int) -> tuple[list, list]:
    """(shuffled distractors, documents with gold at ``position``) for one example."""
    distractors = shuffled(example.distractors, example_rng(seed, example_id, "distractors"))
    return distractors, place_gold(example.gold, distractors, position)


def prompt_examples(tokenizer, examples, example_ids, position, seed, instruction=R1_INSTRUCTION):
    out = []
    for example_id, example in zip(example_ids, examples):
        distractors, documents = arrange(example, example_id, position, seed)
        prompt = segmented_chat_prompt(tokenizer, example, documents, instruction)  # a str (pieces for PINE)
        out.append(PromptedExample(example_id, example, position, distractors, documents, prompt))
    return out


def check_prompt_lengths(backend, prompts: list[str], max_prompt_length: int, where: str) -> int:
    """Fail (never truncate) when a prompt is longer than ``--max-prompt-length``; return the longest."""
    lengths = backend.count_tokens(prompts)
    longest = max(lengths, default=0)
    too_long = sum(1 for n in lengths if n > max_prompt_length)
    if too_long:
        raise UserError(
            f"{where}: {too_long} of {len(prompts)} prompts exceed --max-prompt-length {max_prompt_length} "
            f"(longest {longest} tokens); raise the limit or use fewer documents"
        )
    return longest


def prediction_record(item: PromptedExample, prediction: str) -> dict:
    return {
        "example_id": item.example_id,
        "question": item.example.question,
        "answers": item.example.answers,
        "gold_idx": item.position,
        "prediction": prediction,
        "first_line": first_line(prediction),
        "correct": score_prediction(prediction, item.example.answers),
    }


def evaluate_positions(
    backend,
    examples: list[Example],
    example_ids: list[int],
    positions: list[int],
    *,
    seed: int,
    max_new_tokens: int,
    max_prompt_length: int,
    instruction: str = R1_INSTRUCTION,
    stop_at_newline: bool = True,
    output: ChunkedOutput | None = None,
    positions_per_call: int = 1,
    log=print,
) -> tuple[list[dict], dict]:
    """Greedy answers at each position; one chunk per position when ``output`` resumes work.

    ``positions_per_call`` positions share one ``backend.generate`` call: its batches then mix
    positions, so they can be larger than the example count (the HF backend pays a fixed cost
    per decoding step, whatever the batch). Chunks are still written per position, once the call
    that answered them returns.

    Returns the records and ``{"generated": prompts answered in this call, "seconds": their time}``
    (resumed positions are not counted, so throughput stays honest).
    """
    if positions_per_call < 1:
        raise UserError(f"positions_per_call must be at least 1, got {positions_per_call}")
    by_chunk: dict[int, list[dict]] = {}
    stats = {"generated": 0, "seconds": 0.0}
    pending = []
    for chunk, position in enumerate(positions):
        if output is not None and output.done(chunk):
            by_chunk[chunk] = output.read_chunk(chunk)
            log(f"position {position:>3}: already done (resumed)")
        else:
            pending.append((chunk, position))
    for begin in range(0, len(pending), positions_per_call):
        group = pending[begin : begin + positions_per_call]
        items_per_chunk = [prompt_examples(backend.tokenizer, examples, example_ids, position, seed, instruction)
                           for _, position in group]
        prompts = [it.prompt for items in items_per_chunk for it in items]
        where = "position " + ",".join(str(position) for _, position in group)
        # One check for the whole call: the backend keeps the ids it counted for the generate call
        # on the same prompts, so they are tokenized once.
        check_prompt_lengths(backend, prompts, max_prompt_length, where)
        started = time.perf_counter()
        predictions = backend.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            seed=seed,
            stop_at_newline=stop_at_newline,
            desc=where,
        )
        seconds = time.perf_counter() - started
        stats["generated"] += len(prompts)
        stats["seconds"] += seconds
        offset = 0
        for (chunk, position), items in zip(group, items_per_chunk):
            chunk_records = [prediction_record(it, p) for it, p in zip(items, predictions[offset:])]
            offset += len(items)
            if output is not None:
                output.write_chunk(chunk, chunk_records)
            by_chunk[chunk] = chunk_records
            accuracy = 100.0 * sum(r["correct"] for r in chunk_records) / max(len(chunk_records), 1)
            log(f"position {position:>3}: accuracy {accuracy:5.1f}  ({len(items)} prompts, "
                f"{len(prompts) / seconds:.1f} prompts/s over {len(group)} position(s))")
    records = [record for chunk in range(len(positions)) for record in by_chunk[chunk]]
    return records, stats
