import pytest

import prepare_data
from pos2distill.errors import UserError, run_cli
from pos2distill.formats import load_examples
from pos2distill.jsonl import read_jsonl, write_jsonl
from pos2distill.metrics import normalize_answer
from pos2distill.nq_builder import build_nq_sets

# question, answers, gold title, gold passage
ORACLE = [
    ("who painted the mona lisa", ["Leonardo da Vinci"], "Mona Lisa",
     "The Mona Lisa is a portrait painted by Leonardo da Vinci in the sixteenth century."),
    ("where is the louvre museum", ["Paris"], "Louvre",
     "The Louvre museum in Paris shows the Mona Lisa painting behind glass to crowds who come to see it painted."),
    ("who sketched a flying machine", ["Leonardo"], "Flying machines",
     "Leonardo da Vinci sketched a flying machine; the Mona Lisa painter also painted frescoes."),
    ("what is the capital of japan", ["Tokyo"], "Tokyo",
     "Tokyo is the capital of Japan and its largest city."),
    # Same passage as the previous one, up to whitespace: one pool entry, never its own distractor.
    ("largest city in japan", ["Tokyo"], "Tokyo",
     "Tokyo is the capital  of Japan and its largest  city."),
    ("how many legs does a spider have", ["eight"], "Spider",
     "Spiders are arachnids with eight legs and fangs that inject venom."),
    ("what gas do plants absorb", ["carbon dioxide"], "Photosynthesis",
     "Plants absorb carbon dioxide and release oxygen during photosynthesis."),
    ("when did the titanic sink", ["1912"], "Titanic",
     "RMS Titanic sank in the North Atlantic Ocean in April 1912 after striking an iceberg."),
    ("who discovered penicillin", ["Alexander Fleming"], "Penicillin",
     "Penicillin was discovered by Alexander Fleming at St Mary's Hospital in London."),
]


def oracle_records():
    return [
        {"question": q, "answers": a, "ctxs": [{"title": t, "text": x, "hasanswer": True, "isgold": True}],
         "nq_annotated_gold": {"title": t}}
        for q, a, t, x in ORACLE
    ]


@pytest.fixture
def oracle_path(tmp_path):
    path = str(tmp_path / "oracle.jsonl.gz")
    write_jsonl(path, oracle_records())
    return path


def key(ctx):
    return ctx["title"], " ".join(ctx["text"].split())


def build(oracle_path, total_doc=4, limit=None):
    return build_nq_sets(load_examples(oracle_path, fmt="litm"), total_doc, limit=limit)


def test_invariants(oracle_path):
    result = build(oracle_path, total_doc=4)
    assert result.skipped == []
    assert len(result.records) == len(ORACLE)
    all_golds = {key(r["ctxs"][0]) for r in oracle_records()}
    for record, (question, answers, title, text) in zip(result.records, ORACLE):
        ctxs = record["ctxs"]
        assert record["question"] == question and record["answers"] == answers
        assert record["nq_annotated_gold"] == {"title": title}
        assert len(ctxs) == 4
        assert ctxs[0] == {"title": title, "text": text, "hasanswer": True, "isgold": True}
        distractors = ctxs[1:]
        assert all(c["isgold"] is False and c["hasanswer"] is False for c in distractors)
        keys = [key(c) for c in distractors]
        assert len(set(keys)) == len(keys), "a passage repeated within one record"
        assert set(keys) <= all_golds - {key(ctxs[0])}, "distractors must be other questions' passages"
        for c in distractors:
            passage = normalize_answer(f"{c['title']} {c['text']}")
            assert not any(normalize_answer(a) in passage for a in answers)


def test_bm25_ranks_the_overlapping_passage_first_and_skips_answer_passages(oracle_path):
    mona_lisa = build(oracle_path).records[0]
    titles = [c["title"] for c in mona_lisa["ctxs"][1:]]
    # "Louvre" shares "mona lisa painted"; "Flying machines" shares more but names the answer.
    assert titles[0] == "Louvre"
    assert "Flying machines" not in titles


def test_duplicate_passage_is_neither_its_own_distractor_nor_repeated(oracle_path):
    records = build(oracle_path, total_doc=len(ORACLE) - 1).records
    tokyo_ones = [r for r in records if r["answers"] == ["Tokyo"]]
    assert len(tokyo_ones) == 2
    for record in tokyo_ones:
        assert "Tokyo" not in [c["title"] for c in record["ctxs"][1:]]
    spider = next(r for r in records if r["answers"] == ["eight"])
    assert [c["title"] for c in spider["ctxs"]].count("Tokyo") == 1


def test_deterministic_and_limit_is_a_prefix(oracle_path):
    full = build(oracle_path)
    assert build(oracle_path).records == full.records
    assert build(oracle_path, limit=3).records == full.records[:3]


def test_question_without_enough_answer_free_passages_is_skipped(tmp_path):
    records = oracle_records()
    records[5]["answers"] = ["e"]  # a one-letter answer occurs in every passage
    path = str(tmp_path / "oracle.jsonl")
    write_jsonl(path, records)
    result = build(path)
    assert result.skipped == [(5, ORACLE[5][0])]
    assert len(result.records) == len(ORACLE) - 1


def test_own_passage_is_excluded_even_without_the_answer(tmp_path):
    records = oracle_records()
    records[0]["answers"] = ["a sixteenth century portrait painter"]  # not in its own passage
    path = str(tmp_path / "oracle.jsonl")
    write_jsonl(path, records)
    mona_lisa = build(path).records[0]
    assert mona_lisa["ctxs"][0]["hasanswer"] is False
    assert [c["title"] for c in mona_lisa["ctxs"]].count("Mona Lisa") == 1


def test_total_doc_must_be_positive(oracle_path):
    with pytest.raises(UserError, match="total_doc"):
        build(oracle_path, total_doc=0)
    with pytest.raises(UserError, match="limit"):
        build(oracle_path, limit=-1)


def test_cli_output_loads_as_k_document_sets(oracle_path, tmp_path, capsys):
    output = str(tmp_path / "out" / "nq-4.jsonl.gz")
    prepare_data.main(["nq", "--oracle", oracle_path, "--total_doc", "4", "--output", output])
    assert f"wrote {len(ORACLE)} records (4 documents each) to {output}" in capsys.readouterr().out
    examples = load_examples(output, total_doc=4)
    assert [e.question for e in examples] == [q for q, *_ in ORACLE]
    assert all(e.total_docs == 4 for e in examples)
    assert read_jsonl(output) == build(oracle_path).records


def test_cli_reports_bad_input_as_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prepare_data.main, ["nq", "--oracle", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
