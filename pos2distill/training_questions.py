"""The questions a model was trained on, read from a stage-2 dataset or a stage-1 file."""

import os

from .errors import UserError
from .jsonl import iter_jsonl


def training_questions(path: str) -> set[str]:
    if os.path.isdir(path):
        from datasets import load_from_disk

        return set(load_from_disk(path)["question"])
    if os.path.isfile(path):
        return {record["question"] for _, record in iter_jsonl(path) if "question" in record}
    raise UserError(f"{path}: training data not found")
