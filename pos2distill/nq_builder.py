"""Build k-document NQ sets from the 1-document oracle file, offline.

The public 20-document sets use Contriever-retrieved Wikipedia passages, which are not
available here. Instead each question's distractors are the OTHER questions' gold passages
ranked by BM25 against the question, skipping any passage that contains a gold answer.
Output records use the lost-in-the-middle shape (gold ctx first), so ``formats`` reads them.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import bm25s
import numpy as np

from .errors import UserError
from .metrics import normalize_answer
from .records import Document, Example


def _passage_key(doc: Document) -> tuple[str, str]:
    # Whitespace-only differences count as the same passage (the oracle file has some).
    return doc.title.strip(), " ".join(doc.text.split())


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class PassagePool:
    """Deduplicated gold passages with a BM25 index over ``title text``."""

    def __init__(self, examples: Sequence[Example]):
        self.passages: list[Document] = []
        index_of: dict[tuple[str, str], int] = {}
        self.gold_index: list[int] = []
        for example in examples:
            key = _passage_key(example.gold)
            if key not in index_of:
                index_of[key] = len(self.passages)
                self.passages.append(example.gold)
            self.gold_index.append(index_of[key])
        # Titles are shown in the prompt, so an answer there would leak it too.
        self.normalized = [normalize_answer(f"{doc.title} {doc.text}") for doc in self.passages]
        self.retriever = bm25s.BM25()
        self.retriever.index(_tokenize([f"{doc.title} {doc.text}" for doc in self.passages]), show_progress=False)

    def ranking(self, question_tokens: list[str]) -> np.ndarray:
        """Passage indices, best BM25 score first; ties keep file order (deterministic)."""
        token_ids = self.retriever.get_tokens_ids(question_tokens)
        scores = self.retriever.get_scores_from_ids(token_ids)
        return np.argsort(-scores, kind="stable")

    def contains_answer(self, passage: int, normalized_answers: list[str]) -> bool:
        return any(answer in self.normalized[passage] for answer in normalized_answers)


def _ctx(doc: Document, hasanswer: bool, isgold: bool) -> dict:
    return {"title": doc.title, "text": doc.text, "hasanswer": hasanswer, "isgold": isgold}


@dataclass
class NqBuild:
    """The built records, and the questions left out for lack of answer-free passages.

    A question is left out when too few passages avoid its answer: with the substring
    rule, an answer such as "S" occurs in every passage (and the metric would count
    almost any prediction correct for it anyway).
    """

    records: list[dict]
    skipped: list[tuple[int, str]]  # (0-based question index, question)


def build_nq_sets(examples: Sequence[Example], total_doc: int, limit: Optional[int] = None) -> NqBuild:
    """Lost-in-the-middle records with ``total_doc`` ctxs: the gold one, then BM25 distractors.

    All examples form the passage pool; only the first ``limit`` get a record, so a
    limited run gives the same records as the head of a full one.
    """
    if total_doc < 1:
        raise UserError(f"--total_doc must be at least 1, got {total_doc}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    pool = PassagePool(examples)
    chosen = list(examples if limit is None else examples[:limit])
    questions = _tokenize([example.question for example in chosen])
    build = NqBuild(records=[], skipped=[])
    for i, (example, tokens) in enumerate(zip(chosen, questions)):
        answers = [a for a in (normalize_answer(answer) for answer in example.answers) if a]
        own = pool.gold_index[i]
        distractors = []
        for passage in pool.ranking(tokens):
            if len(distractors) == total_doc - 1:
                break
            if passage != own and not pool.contains_answer(passage, answers):
                distractors.append(pool.passages[passage])
        if len(distractors) < total_doc - 1:
            build.skipped.append((i, example.question))
            continue
        gold_has_answer = pool.contains_answer(own, answers)
        ctxs = [_ctx(example.gold, gold_has_answer, True)] + [_ctx(doc, False, False) for doc in distractors]
        record = {"question": example.question, "answers": list(example.answers), "ctxs": ctxs}
        # Extra oracle fields (e.g. nq_annotated_gold) ride along, never replacing the above.
        record.update((key, value) for key, value in example.meta.items() if key not in record)
        build.records.append(record)
    return build
