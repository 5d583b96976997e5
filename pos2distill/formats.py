"""Loaders that turn every supported input file into normalized ``Example`` records.

Formats (names accepted by ``--format``):

- ``litm``: lost-in-the-middle QA, ``question``, ``answers``, ``ctxs`` with exactly
  one ``isgold: true`` context (the oracle file has only that one).
- ``raw``: Pos2Distill's own format, ``question``, ``answers``, ``gold_document``,
  ``distractors`` and optionally ``kind``; also what the stage scripts write.
- ``kv``: lost-in-the-middle key-value retrieval, ``ordered_kv_records``, ``key``, ``value``.
- ``dpr``: DPR-style TriviaQA / WebQuestions, ``positive_ctxs``, ``hard_negative_ctxs``,
  ``negative_ctxs``.
"""

from typing import Any, Callable, Iterator, Optional

from .errors import UserError
from .jsonl import iter_jsonl
from .metrics import normalize_answer
from .records import Document, Example

KINDS = ("qa", "kv")
RAW_FIELDS = ("question", "answers", "gold_document", "distractors", "kind")
_LITM_FIELDS = ("question", "answers", "ctxs")
_DPR_FIELDS = ("question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs")
_KV_FIELDS = ("ordered_kv_records", "key", "value")


class RecordError(UserError):
    """A problem inside one record; the loader prefixes it with ``file:line``."""


def _require(record: dict, field: str) -> Any:
    if field not in record:
        raise RecordError(f"missing field {field!r}")
    return record[field]


def _question(record: dict) -> str:
    question = _require(record, "question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"'question' must be a non-empty string, got {question!r}")
    return question


def check_answers(answers: Any, allow_string: bool = True) -> list[str]:
    """The gold answers as a list of strings, at least one of which can ever be matched.

    A lone string is one answer where ``allow_string`` (input formats), and an error otherwise
    (stage-1 files, which always hold lists): iterated, it would be a list of characters.
    """
    if isinstance(answers, str) and allow_string:
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise RecordError(f"'answers' must be a non-empty list of strings, got {answers!r:.80}")
    for answer in answers:
        if not isinstance(answer, str):
            raise RecordError(f"'answers' must hold strings only, got {answer!r:.80}")
    if not any(answer.strip() for answer in answers):
        raise RecordError("'answers' holds only empty strings")
    if not any(normalize_answer(answer) for answer in answers):
        raise RecordError(f"'answers' {answers!r:.80} normalise to nothing (articles and punctuation are "
                          f"dropped before scoring): no prediction can ever match")
    return list(answers)


def _answers(record: dict) -> list[str]:
    return check_answers(_require(record, "answers"))


def _document(value: Any, where: str) -> Document:
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise RecordError(f"{where} must be an object with a string 'text', got {value!r:.80}")
    title = value.get("title")
    return Document(title="" if title is None else str(title), text=value["text"])


def _documents(value: Any, field: str) -> list[Document]:
    if not isinstance(value, list):
        raise RecordError(f"{field!r} must be a list, got {type(value).__name__}")
    return [_document(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _extra_fields(record: dict, known: tuple) -> dict:
    return {key: value for key, value in record.items() if key not in known}


def parse_litm(record: dict) -> Example:
    question, answers = _question(record), _answers(record)
    ctxs = _documents(_require(record, "ctxs"), "ctxs")
    gold_indices = [i for i, ctx in enumerate(record["ctxs"]) if ctx.get("isgold") is True]
    if len(gold_indices) != 1:
        found = "none" if not gold_indices else f"{len(gold_indices)} (ctxs {gold_indices})"
        raise RecordError(f"expected exactly one ctx with 'isgold': true, found {found}")
    gold_index = gold_indices[0]
    distractors = ctxs[:gold_index] + ctxs[gold_index + 1:]
    return Example(question, answers, ctxs[gold_index], distractors, "qa", _extra_fields(record, _LITM_FIELDS))


def parse_raw(record: dict) -> Example:
    question, answers = _question(record), _answers(record)
    gold = _document(_require(record, "gold_document"), "'gold_document'")
    distractors = _documents(_require(record, "distractors"), "distractors")
    kind = record.get("kind", "qa")
    if kind not in KINDS:
        raise RecordError(f"'kind' must be one of {list(KINDS)}, got {kind!r}")
    return Example(question, answers, gold, distractors, kind, _extra_fields(record, RAW_FIELDS))


def parse_kv(record: dict) -> Example:
    pairs = _require(record, "ordered_kv_records")
    key, value = _require(record, "key"), _require(record, "value")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise RecordError("'ordered_kv_records' must be a list of [key, value] pairs")
    keys = [str(k) for k, _ in pairs]
    matches = [i for i, k in enumerate(keys) if k == str(key)]
    if len(matches) != 1:
        problem = "is missing from" if not matches else f"occurs {len(matches)} times in"
        raise RecordError(f"key {key!r} {problem} 'ordered_kv_records'")
    gold_index = matches[0]
    if str(pairs[gold_index][1]) != str(value):
        raise RecordError(f"'value' {value!r} differs from the value paired with key {key!r}")
    documents = [Document(title=k, text=str(v)) for k, (_, v) in zip(keys, pairs)]
    distractors = documents[:gold_index] + documents[gold_index + 1:]
    meta = {"gold_index": gold_index, **_extra_fields(record, _KV_FIELDS)}
    return Example(str(key), [str(value)], documents[gold_index], distractors, "kv", meta)


def parse_dpr(record: dict) -> Example:
    question, answers = _question(record), _answers(record)
    positives = _documents(_require(record, "positive_ctxs"), "positive_ctxs")
    if not positives:
        raise RecordError("'positive_ctxs' is empty: no gold document")
    # Either negative list may be absent; hard negatives are the more useful distractors.
    hard = _documents(record.get("hard_negative_ctxs", []), "hard_negative_ctxs")
    negatives = _documents(record.get("negative_ctxs", []), "negative_ctxs")
    return Example(question, answers, positives[0], hard + negatives, "qa", _extra_fields(record, _DPR_FIELDS))


PARSERS: dict[str, Callable[[dict], Example]] = {
    "litm": parse_litm,
    "raw": parse_raw,
    "kv": parse_kv,
    "dpr": parse_dpr,
}

# The field that identifies each format, checked in this order.
_SIGNATURES = (("ordered_kv_records", "kv"), ("gold_document", "raw"), ("ctxs", "litm"), ("positive_ctxs", "dpr"))


def detect_format(record: dict) -> str:
    """The format name of ``record`` (a key of ``PARSERS``), from its identifying field."""
    for field, name in _SIGNATURES:
        if field in record:
            return name
    expected = ", ".join(f"{field!r} ({name})" for field, name in _SIGNATURES)
    raise RecordError(f"cannot tell the record format: expected one of {expected}; found fields {sorted(record)}")


def _check_format_name(fmt: str) -> None:
    if fmt != "auto" and fmt not in PARSERS:
        raise UserError(f"--format must be 'auto' or one of {sorted(PARSERS)}, got {fmt!r}")


def _truncate(example: Example, total_doc: int, fmt: str) -> Example:
    needed = total_doc - 1
    have = len(example.distractors)
    if have < needed:
        message = f"has {have + 1} documents (gold + {have} distractors) but --total_doc {total_doc} needs {total_doc}"
        if fmt == "litm" and have == 0:
            message += (
                "; this looks like the 1-document oracle file: build k-document sets with "
                f"`python prepare_data.py nq --oracle FILE --total_doc {total_doc} --output OUT.jsonl.gz`"
            )
        raise RecordError(message)
    example.distractors = example.distractors[:needed]
    return example


def iter_examples(
    path: str, fmt: str = "auto", total_doc: Optional[int] = None, limit: Optional[int] = None
) -> Iterator[Example]:
    """Yield normalized examples from ``path``; a bad record is a UserError naming file:line.

    With ``fmt="auto"`` the format is detected on the first record and then required of all.
    ``total_doc`` keeps the first ``total_doc - 1`` distractors and rejects records with fewer.
    """
    _check_format_name(fmt)
    if total_doc is not None and total_doc < 1:
        raise UserError(f"--total_doc must be at least 1, got {total_doc}")
    if limit is not None and limit <= 0:
        return
    count = 0
    for lineno, record in iter_jsonl(path):
        try:
            if fmt == "auto":
                fmt = detect_format(record)
            example = PARSERS[fmt](record)
            if total_doc is not None:
                example = _truncate(example, total_doc, fmt)
        except RecordError as err:
            raise UserError(f"{path}:{lineno}: {err}") from err
        yield example
        count += 1
        if limit is not None and count >= limit:
            return


def load_examples(
    path: str, fmt: str = "auto", total_doc: Optional[int] = None, limit: Optional[int] = None
) -> list[Example]:
    """All examples of ``path`` as a list; see ``iter_examples``."""
    return list(iter_examples(path, fmt=fmt, total_doc=total_doc, limit=limit))


def example_to_raw(example: Example) -> dict:
    """The raw-format record for ``example``; ``meta`` fields are carried along untouched."""
    record = dict(example.meta)
    record.update(
        question=example.question,
        answers=list(example.answers),
        gold_document=example.gold.to_dict(),
        distractors=[doc.to_dict() for doc in example.distractors],
        kind=example.kind,
    )
    return record
