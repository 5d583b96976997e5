"""Answer scoring: best-subspan exact match on the first line of a prediction."""

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(prediction: str) -> str:
    """The part that is scored: the first line of the stripped prediction."""
    return prediction.strip().split("\n")[0]


def best_subspan_em(prediction: str, answers: list[str]) -> float:
    """1.0 if any normalized gold answer is a substring of the normalized prediction."""
    if isinstance(answers, str):  # would be scored as a list of its characters
        raise TypeError(f"answers must be a list of strings, got the string {answers!r:.80}")
    normalized = normalize_answer(prediction)
    for answer in answers:
        gold = normalize_answer(answer)
        if gold and gold in normalized:
            return 1.0
    return 0.0


def score_prediction(prediction: str, answers: list[str]) -> float:
    """The project's metric: best-subspan EM on the first line only."""
    return best_subspan_em(first_line(prediction), answers)
