"""Stage-2 position pairs as token sequences for the teacher and the student.

A row of the stage-2 dataset (``create_datasets.py``, saved with ``save_to_disk``) holds
one copy of an example: the student's document order (``documents``, gold at
``gold_idx``) and the stage-1 order the teacher sees (``teacher_documents``). Both
prompts get the same response: the first line of ``oracle_answer`` plus EOS.
"""

import os
from typing import Optional

import torch
from torch.utils.data import Dataset

from pos2distill.errors import UserError
from pos2distill.metrics import first_line
from pos2distill.prompting import R1_INSTRUCTION, chat_prompt, user_message
from pos2distill.records import Document, Example

PAIR_COLUMNS = ("kind", "instruction", "documents", "gold_idx", "teacher_documents", "is_anchor")


def resolve_dataset_path(dataset: str, data_root: str = "data") -> str:
    """``dataset`` itself when it exists, else ``{data_root}/{dataset}``."""
    for candidate in (dataset, os.path.join(data_root, dataset)):
        if os.path.isdir(candidate):
            return candidate
    raise UserError(f"--dataset {dataset!r}: no such folder (also looked in {os.path.join(data_root, dataset)!r})")


def load_pairs(path: str, input_key: str, output_key: str, max_samples: Optional[int] = None):
    """The saved stage-2 dataset (the ``train`` split of a DatasetDict), first ``max_samples`` rows."""
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(data)})")
        data = data["train"]
    missing = [c for c in (input_key, output_key, *PAIR_COLUMNS) if c not in data.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (have {', '.join(data.column_names)})")
    if max_samples is not None and max_samples < len(data):
        data = data.select(range(max_samples))
    return data


def _documents(raw) -> list:
    return [Document.from_dict(d) for d in raw]


def _example(row: dict, input_key: str) -> Example:
    documents = _documents(row["documents"])
    gold_idx = int(row["gold_idx"])
    if not 0 <= gold_idx < len(documents):
        raise UserError(
            f"row with {input_key}={row[input_key]!r}: gold_idx {gold_idx} outside its {len(documents)} documents"
        )
    return Example(
        question=str(row[input_key]),
        answers=list(row.get("answers") or []),
        gold=documents[gold_idx],
        distractors=documents[:gold_idx] + documents[gold_idx + 1:],
        kind=row["kind"],
    )


class PairDataset(Dataset):
    """Tokenized (student, teacher) sequences sharing one response.

    Each item: ``student_ids`` = student prompt + response, ``teacher_ids`` = teacher prompt +
    response, ``response_len``, ``gold_idx``, ``is_anchor``. Rows whose student or teacher
    sequence is longer than ``max_len`` are dropped (``self.dropped`` counts them).
    """

    def __init__(self, rows, tokenizer, max_len: int, input_key: str = "question",
                 output_key: str = "oracle_answer", apply_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if tokenizer.eos_token_id is None:
            raise UserError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token")
        self.apply_chat_template = apply_chat_template
        self.items = []
        self.dropped = 0
        self.empty_answers = 0
        prompt_cache = {}
        for row in rows:
            example = _example(row, input_key)
            # Stage 1 writes the instruction it used; records without one used the reference prompt.
            instruction = row["instruction"] or R1_INSTRUCTION
            teacher_ids = self._prompt_ids(example, row["teacher_documents"], instruction, prompt_cache)
            student_ids = self._prompt_ids(example, row["documents"], instruction, prompt_cache)
            answer = first_line(str(row[output_key] or ""))
            if not answer:
                self.empty_answers += 1
            response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if max(len(teacher_ids), len(student_ids)) + len(response) > max_len:
                self.dropped += 1
                continue
            self.items.append({
                "student_ids": student_ids + response,
                "teacher_ids": teacher_ids + response,
                "response_len": len(response),
                "gold_idx": int(row["gold_idx"]),
                "is_anchor": bool(row["is_anchor"]),
            })

    def _prompt_ids(self, example: Example, documents, instruction: str, cache: dict) -> list:
        message = user_message(example, _documents(documents), instruction)
        text = chat_prompt(self.tokenizer, message) if self.apply_chat_template else message
        if text not in cache:
            # The chat template already carries any BOS; a plain prompt gets the tokenizer's own.
            cache[text] = self.tokenizer(text, add_special_tokens=not self.apply_chat_template)["input_ids"]
        return cache[text]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]

    def collate_fn(self, items: list) -> dict:
        """Pad student rows and the *distinct* teacher rows of a micro-batch (see :func:`pad_before_tail`).

        Every row ends at the last position, so the response of each row lies in the last
        ``width = max response_len`` slots (right-aligned): ``labels`` and ``response_mask``
        are ``[batch, width]``. Copies of one example share a teacher sequence;
        ``teacher_index[b]`` picks row b's teacher row, so the teacher runs once per
        distinct input.
        """
        width = max(item["response_len"] for item in items)
        tails = [item["response_len"] + 1 for item in items]
        student_ids, student_mask = pad_before_tail([item["student_ids"] for item in items], tails, self.pad_token_id)
        distinct = {}
        teacher_index = [distinct.setdefault(tuple(item["teacher_ids"]), len(distinct)) for item in items]
        teacher_tails = [0] * len(distinct)
        for item, row in zip(items, teacher_index):
            teacher_tails[row] = item["response_len"] + 1
        teacher_ids, teacher_mask = pad_before_tail([list(ids) for ids in distinct], teacher_tails, self.pad_token_id)
        slots = torch.arange(width)
        lengths = torch.tensor([item["response_len"] for item in items])
        response_mask = (slots[None, :] >= width - lengths[:, None]).float()
        tail_ids = student_ids[:, -width:]
        labels = torch.where(response_mask.bool(), tail_ids, torch.full_like(tail_ids, -100))
        return {
            "student_input_ids": student_ids,
            "student_attention_mask": student_mask,
            "teacher_input_ids": teacher_ids,
            "teacher_attention_mask": teacher_mask,
            "teacher_index": torch.tensor(teacher_index),
            "labels": labels,
            "response_mask": response_mask,
            "gold_idx": torch.tensor([item["gold_idx"] for item in items]),
            "is_anchor": torch.tensor([item["is_anchor"] for item in items]),
        }


def pad_before_tail(sequences: list, tails: list, pad_id: int) -> tuple:
    """Pad each row to the longest by inserting pads *before its last ``tail`` tokens*.

    A row becomes ``head + [pad] * n + tail`` (mask ``1..1 0..0 1..1``); with
    ``tail = response length + 1`` the last prompt token stays next to the response and
    every row ends at the last position, as with left padding, so the response-predicting
    outputs are the same slots in every row. Unlike left padding, no query row is fully
    masked: a pad attends to the head before it. (The cuDNN SDPA kernel returns NaN
    gradients for fully masked rows in bf16 — measured on an H200 with torch 2.11.)
    Positions come from the mask (``cumsum - 1``), so the gap does not shift RoPE.
    """
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, (seq, tail) in enumerate(zip(sequences, tails)):
        head = max(len(seq) - tail, 0)
        ids[row, :head] = torch.tensor(seq[:head], dtype=torch.long)
        mask[row, :head] = 1
        ids[row, longest - (len(seq) - head):] = torch.tensor(seq[head:], dtype=torch.long)
        mask[row, longest - (len(seq) - head):] = 1
    return ids, mask
