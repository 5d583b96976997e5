"""Stage 2: advantageous/trivial position pairs from stage-1 answers.

Walk the stage-1 records in order, keep those whose sampled answer is correct
(or every one, for the unfiltered control), stop after ``example_num``. Each kept example becomes ``position_sample_num``
copies with the gold document at distinct trivial positions (sampled without
replacement) plus ``strengthen`` anchor copies at the advantageous position;
every copy reshuffles the distractors. The teacher side keeps the stage-1
order (gold at the advantageous position).
"""

from collections import Counter

from .errors import UserError
from .formats import RecordError, check_answers
from .metrics import score_prediction
from .positions import example_rng, place_gold, shuffled
from .records import Document

REQUIRED_STAGE1_FIELDS = ("question", "answers", "gold_document", "distractors", "documents", "gold_idx", "oracle_answer")


def _check_types(record: dict, where: str) -> None:
    """Field types of a stage-1 record: a string ``answers`` must not be read as a list of characters,
    nor a null ``oracle_answer`` reach the scorer."""
    try:
        check_answers(record["answers"], allow_string=False)
    except RecordError as err:
        raise UserError(f"{where}: {err}") from None
    for key in ("question", "oracle_answer"):
        if not isinstance(record[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {record[key]!r:.80}")
    for key in ("distractors", "documents"):
        docs = record[key]
        if not isinstance(docs, list) or not all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in docs):
            raise UserError(f"{where}: {key!r} must be a list of objects with a string 'text'")
    gold = record["gold_document"]
    if not isinstance(gold, dict) or not isinstance(gold.get("text"), str):
        raise UserError(f"{where}: 'gold_document' must be an object with a string 'text', got {gold!r:.80}")


def _check_record(record: dict, where: str, total_docs: int) -> None:
    for key in REQUIRED_STAGE1_FIELDS:
        if key not in record:
            raise UserError(f"{where}: missing field '{key}' (is this a stage-1 output file?)")
    _check_types(record, where)
    if not isinstance(record["documents"], list) or len(record["documents"]) != total_docs:
        have = len(record["documents"]) if isinstance(record["documents"], list) else "no list of"
        raise UserError(f"{where}: {have} documents, expected --total_doc {total_docs}")
    gold_idx = record["gold_idx"]
    if not isinstance(gold_idx, int) or isinstance(gold_idx, bool) or not 0 <= gold_idx < total_docs:
        raise UserError(f"{where}: 'gold_idx' {gold_idx!r} out of range 0..{total_docs - 1} for --total_doc {total_docs}")
    if record["documents"][gold_idx] != record["gold_document"]:
        raise UserError(f"{where}: documents[gold_idx={gold_idx}] is not the record's 'gold_document'")


def select_correct(
    records: list[tuple[str, dict]], example_num: int, total_docs: int, require_correct: bool = True
) -> list[tuple[str, dict]]:
    """The first ``example_num`` records whose oracle answer is correct (-1: all of them).

    ``require_correct=False`` keeps the first ``example_num`` whatever their answer: a control
    that tells the gain of learning from correct answers only apart from the rest."""
    if example_num < -1 or example_num == 0:
        raise UserError(f"--example_num must be -1 (every correct example) or at least 1, got {example_num}")
    kept = []
    for where, record in records:
        _check_record(record, where, total_docs)
        if not require_correct or score_prediction(record["oracle_answer"], record["answers"]):
            kept.append((where, record))
            if len(kept) == example_num:
                break
    passing = "pass the filter (correct oracle answer)" if require_correct else "are in the stage-1 file"
    if not kept:
        raise UserError(f"none of the {len(records)} examples {passing}; nothing to train on")
    if example_num >= 0 and len(kept) < example_num:
        raise UserError(f"only {len(kept)} of {len(records)} examples {passing}; lower --example_num (asked for {example_num})")
    return kept


def build_rows(kept, total_docs: int, k: int, strengthen: int, seed: int) -> list[dict]:
    positions = {record["gold_idx"] for _, record in kept}
    if len(positions) > 1:
        raise UserError(f"stage-1 records mix advantageous positions {sorted(positions)}; use one stage-1 file")
    advantageous = positions.pop()
    trivial = [p for p in range(total_docs) if p != advantageous]
    if not 0 <= k <= len(trivial):
        raise UserError(f"--position_sample_num {k} must be 0..{len(trivial)} for {total_docs} documents")
    if strengthen < 0:
        raise UserError(f"--strengthen must be >= 0, got {strengthen}")
    rows = []
    for _, record in kept:
        example_id = record.get("example_id", len(rows))
        rng = example_rng(seed, example_id, "pairs")
        gold = Document.from_dict(record["gold_document"])
        distractors = [Document.from_dict(d) for d in record["distractors"]]
        copies = [(p, False) for p in rng.sample(trivial, k)] + [(advantageous, True)] * strengthen
        for position, is_anchor in copies:
            documents = place_gold(gold, shuffled(distractors, rng), position)
            rows.append({
                "example_id": example_id,
                "question": record["question"],
                "answers": list(record["answers"]),
                "kind": record.get("kind", "qa"),
                "instruction": record.get("instruction", ""),
                "oracle_answer": record["oracle_answer"],
                "documents": [d.to_dict() for d in documents],
                "gold_idx": position,
                "teacher_documents": record["documents"],
                "teacher_gold_idx": advantageous,
                "is_anchor": is_anchor,
            })
    return rows


def position_counts(rows: list[dict], total_docs: int) -> dict[int, int]:
    counts = Counter(row["gold_idx"] for row in rows)
    return {p: counts.get(p, 0) for p in range(total_docs)}
