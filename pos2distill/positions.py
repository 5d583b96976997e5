"""Placing the gold document among shuffled distractors, and position lists."""

import random
from typing import Sequence

from .errors import UserError
from .records import Document


def shuffled(distractors: Sequence[Document], rng: random.Random) -> list[Document]:
    """A shuffled copy; the caller's list is left alone."""
    out = list(distractors)
    rng.shuffle(out)
    return out


def place_gold(gold: Document, distractors: Sequence[Document], position: int) -> list[Document]:
    """The distractors in order with ``gold`` inserted at index ``position``."""
    if not 0 <= position <= len(distractors):
        raise UserError(f"gold position {position} out of range 0..{len(distractors)}")
    docs = list(distractors)
    docs.insert(position, gold)
    return docs


def parse_position(value: str, total_docs: int, flag: str = "gold position") -> int:
    """One position: an index 0..total_docs-1, ``first`` or ``last``; errors name ``flag``."""
    value = str(value).strip().lower()
    if value == "last":
        return total_docs - 1
    if value == "first":
        return 0
    try:
        position = int(value)
    except ValueError:
        raise UserError(f"{flag}: a position must be an integer, 'first' or 'last', got {value!r}") from None
    if not 0 <= position < total_docs:
        raise UserError(f"{flag} {position} out of range 0..{total_docs - 1} for --total_doc {total_docs}")
    return position


def parse_positions(spec: str, total_docs: int, flag: str = "gold position") -> list[int]:
    """``all`` (default) or a comma list such as ``0,4,9,last``; sorted, de-duplicated."""
    if spec is None or str(spec).strip().lower() == "all":
        return list(range(total_docs))
    positions = sorted({parse_position(part, total_docs, flag) for part in str(spec).split(",") if part.strip()})
    if not positions:
        raise UserError(f"{flag}: no positions given ({spec!r})")
    return positions


def example_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """A generator that depends only on (seed, example index, salt): stable under resumption."""
    return random.Random(f"{seed}:{index}:{salt}")
