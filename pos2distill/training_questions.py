"""The questions a model was trained on, read from a stage-2 dataset or a stage-1 file."""

import os

from .errors import UserError
from .jsonl import iter_jsonl


def training_questions(path: str) -> set[str]:
    if os.path.isdir(path):
        from datasets import DatasetDict, load_from_disk

        try:
            data = load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"--train_dataset {path}: not a dataset saved with save_to_disk ({err})") from None
        splits = list(data.values()) if isinstance(data, DatasetDict) else [data]
        if any("question" not in split.column_names for split in splits):
            raise UserError(f"--train_dataset {path}: no 'question' column")
        return {question for split in splits for question in split["question"]}
    if os.path.isfile(path):
        questions = set()
        for line, record in iter_jsonl(path):
            if "question" in record:
                if not isinstance(record["question"], str):
                    raise UserError(f"{path}:{line}: 'question' must be a string, got {record['question']!r:.60}")
                questions.add(record["question"])
        return questions
    raise UserError(f"--train_dataset {path}: no such file or folder")
