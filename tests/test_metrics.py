import pytest

from pos2distill.metrics import best_subspan_em, first_line, normalize_answer, score_prediction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An   apple, a day ", "apple day"),
        ("Wilhelm Conrad Röntgen.", "wilhelm conrad röntgen"),
        ("theater", "theater"),  # 'the' only as a whole word
        ("U.S.A.", "usa"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("It was Wilhelm Conrad Röntgen in 1901.", ["Wilhelm Conrad Röntgen"], 1.0),
        ("the answer is Paris", ["paris", "Lyon"], 1.0),
        ("Lyonnais", ["Lyon"], 1.0),  # substring, not token match: the reference metric
        ("Marseille", ["Paris", "Lyon"], 0.0),
        ("anything", ["the"], 0.0),  # an answer that normalizes to nothing never matches
        ("", ["Paris"], 0.0),
    ],
)
def test_best_subspan_em(prediction, answers, expected):
    assert best_subspan_em(prediction, answers) == expected


def test_only_the_first_line_is_scored():
    assert first_line("\n  Paris\nbut maybe Lyon") == "Paris"
    assert score_prediction("\nParis is the capital.\nLyon", ["Lyon"]) == 0.0
    assert score_prediction("\nParis is the capital.\nLyon", ["Paris"]) == 1.0
