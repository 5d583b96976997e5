import gzip
import json
import os

import pytest

from pos2distill.errors import UserError
from pos2distill.formats import detect_format, example_to_raw, iter_examples, load_examples
from pos2distill.jsonl import write_jsonl
from pos2distill.records import Document

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def ctx(title, text, isgold=False, hasanswer=False):
    return {"title": title, "text": text, "hasanswer": hasanswer, "isgold": isgold}


def litm_record(question="who wrote hamlet", answers=("William Shakespeare",), golds=(1,), n=3):
    ctxs = [ctx(f"T{i}", f"text {i}", isgold=i in golds) for i in range(n)]
    return {"question": question, "answers": list(answers), "ctxs": ctxs, "nq_annotated_gold": {"title": "T1"}}


def write(tmp_path, records, name="data.jsonl"):
    path = str(tmp_path / name)
    write_jsonl(path, records)
    return path


def test_litm_gold_and_distractors_in_file_order(tmp_path):
    path = write(tmp_path, [litm_record()], "litm.jsonl.gz")
    [example] = load_examples(path)
    assert example.question == "who wrote hamlet"
    assert example.answers == ["William Shakespeare"]
    assert example.gold == Document("T1", "text 1")
    assert [d.title for d in example.distractors] == ["T0", "T2"]
    assert example.kind == "qa"
    assert example.meta == {"nq_annotated_gold": {"title": "T1"}}


def test_litm_oracle_record_has_no_distractors(tmp_path):
    path = write(tmp_path, [litm_record(golds=(0,), n=1)])
    [example] = load_examples(path)
    assert example.gold.title == "T0"
    assert example.distractors == []
    assert example.total_docs == 1


def test_raw_loader_keeps_extra_fields_in_meta_and_round_trips(tmp_path):
    record = {
        "question": "k1",
        "answers": ["v1"],
        "gold_document": {"title": "k1", "text": "v1"},
        "distractors": [{"title": "k0", "text": "v0"}, {"title": "k2", "text": "v2"}],
        "kind": "kv",
        "oracle_answer": "v1",
        "gold_idx": 3,
        "documents": [{"title": "k1", "text": "v1"}],
    }
    path = write(tmp_path, [record])
    [example] = load_examples(path)
    assert example.kind == "kv"
    assert example.gold == Document("k1", "v1")
    assert [d.text for d in example.distractors] == ["v0", "v2"]
    assert example.meta == {"oracle_answer": "v1", "gold_idx": 3, "documents": [{"title": "k1", "text": "v1"}]}
    assert example_to_raw(example) == record


def test_raw_kind_defaults_to_qa_and_rejects_unknown(tmp_path):
    record = {"question": "q", "answers": ["x"], "gold_document": {"title": "t", "text": "a"}, "distractors": []}
    assert load_examples(write(tmp_path, [record]))[0].kind == "qa"
    with pytest.raises(UserError, match=r"data.jsonl:1: 'kind'"):
        load_examples(write(tmp_path, [{**record, "kind": "mcq"}]))


def test_kv_loader(tmp_path):
    pairs = [["ka", "va"], ["kb", "vb"], ["kc", "vc"], ["kd", "vd"]]
    path = write(tmp_path, [{"ordered_kv_records": pairs, "key": "kc", "value": "vc"}])
    [example] = load_examples(path)
    assert example.kind == "kv"
    assert example.question == "kc"
    assert example.answers == ["vc"]
    assert example.gold == Document("kc", "vc")
    assert [(d.title, d.text) for d in example.distractors] == [("ka", "va"), ("kb", "vb"), ("kd", "vd")]
    assert example.meta == {"gold_index": 2}


def test_kv_key_missing_from_records_is_an_error(tmp_path):
    path = write(tmp_path, [{"ordered_kv_records": [["ka", "va"]], "key": "kz", "value": "vz"}])
    with pytest.raises(UserError, match=r"data.jsonl:1: key 'kz' is missing"):
        load_examples(path)


def test_kv_value_must_match_the_pair(tmp_path):
    path = write(tmp_path, [{"ordered_kv_records": [["ka", "va"]], "key": "ka", "value": "other"}])
    with pytest.raises(UserError, match=r"data.jsonl:1: 'value'"):
        load_examples(path)


def test_dpr_gold_is_first_positive_then_hard_negatives_then_negatives(tmp_path):
    record = {
        "question": "q",
        "answers": ["x"],
        "dataset": "trivia",
        "positive_ctxs": [{"title": "P1", "text": "a p1"}, {"title": "P2", "text": "a p2"}],
        "negative_ctxs": [{"title": "N1", "text": "n1"}],
        "hard_negative_ctxs": [{"title": "H1", "text": "h1"}, {"title": "H2", "text": "h2"}],
    }
    [example] = load_examples(write(tmp_path, [record]))
    assert example.gold.title == "P1"
    assert [d.title for d in example.distractors] == ["H1", "H2", "N1"]
    assert example.meta == {"dataset": "trivia"}


def test_dpr_without_positive_is_an_error(tmp_path):
    record = {"question": "q", "answers": ["x"], "positive_ctxs": [], "negative_ctxs": [], "hard_negative_ctxs": []}
    with pytest.raises(UserError, match=r"data.jsonl:1: 'positive_ctxs' is empty"):
        load_examples(write(tmp_path, [record]))


@pytest.mark.parametrize(
    "record, expected",
    [
        (litm_record(), "litm"),
        ({"question": "q", "answers": ["x"], "gold_document": {"text": "x"}, "distractors": []}, "raw"),
        ({"ordered_kv_records": [["k", "v"]], "key": "k", "value": "v"}, "kv"),
        ({"question": "q", "answers": ["x"], "positive_ctxs": [], "hard_negative_ctxs": []}, "dpr"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_unknown_names_the_expected_fields():
    with pytest.raises(UserError, match="cannot tell the record format.*gold_document"):
        detect_format({"question": "q", "answers": ["x"]})


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(litm_record()) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        load_examples(str(path))


@pytest.mark.parametrize("field", ["question", "answers"])
def test_missing_required_field_names_file_line_and_field(tmp_path, field):
    bad = litm_record()
    del bad[field]
    path = write(tmp_path, [litm_record(), bad])
    with pytest.raises(UserError, match=rf"data.jsonl:2: missing field '{field}'"):
        load_examples(path)


def test_missing_gold_field_in_raw_format(tmp_path):
    path = write(tmp_path, [{"question": "q", "answers": ["x"], "distractors": []}])
    with pytest.raises(UserError, match=r"data.jsonl:1: missing field 'gold_document'"):
        load_examples(path, fmt="raw")


def test_later_record_must_match_the_detected_format(tmp_path):
    path = write(tmp_path, [litm_record(), {"question": "q", "answers": ["x"]}])
    with pytest.raises(UserError, match=r"data.jsonl:2: missing field 'ctxs'"):
        load_examples(path)


def test_answers_must_be_a_non_empty_list_of_strings(tmp_path):
    with pytest.raises(UserError, match=r"data.jsonl:1: 'answers' must be a non-empty list"):
        load_examples(write(tmp_path, [litm_record(answers=())]))
    with pytest.raises(UserError, match=r"data.jsonl:1: 'answers' must hold strings"):
        load_examples(write(tmp_path, [{**litm_record(), "answers": [1998]}]))


def test_bare_string_answer_is_wrapped(tmp_path):
    [example] = load_examples(write(tmp_path, [{**litm_record(), "answers": "Shakespeare"}]))
    assert example.answers == ["Shakespeare"]


def test_record_without_gold_is_an_error(tmp_path):
    path = write(tmp_path, [litm_record(), litm_record(golds=())])
    with pytest.raises(UserError, match=r"data.jsonl:2: expected exactly one ctx with 'isgold': true, found none"):
        load_examples(path)


def test_record_with_two_golds_is_an_error(tmp_path):
    path = write(tmp_path, [litm_record(golds=(0, 2))])
    with pytest.raises(UserError, match=r"data.jsonl:1: expected exactly one .* found 2"):
        load_examples(path)


def test_total_doc_keeps_the_first_distractors(tmp_path):
    path = write(tmp_path, [litm_record(golds=(2,), n=6)])
    [example] = load_examples(path, total_doc=3)
    assert example.total_docs == 3
    assert [d.title for d in example.distractors] == ["T0", "T1"]


def test_too_few_documents_for_total_doc(tmp_path):
    path = write(tmp_path, [litm_record(n=5), litm_record(n=3)])
    with pytest.raises(UserError, match=r"data.jsonl:2: has 3 documents \(gold \+ 2 distractors\).*needs 5") as err:
        load_examples(path, total_doc=5)
    assert "prepare_data.py nq" not in str(err.value)


def test_oracle_file_with_total_doc_points_at_prepare_data(tmp_path):
    path = write(tmp_path, [litm_record(golds=(0,), n=1)], "nq-open-oracle.jsonl.gz")
    with pytest.raises(UserError, match=r"nq-open-oracle.jsonl.gz:1: has 1 documents.*prepare_data.py nq"):
        load_examples(path, total_doc=20)


def test_limit_and_lazy_iteration(tmp_path):
    path = tmp_path / "data.jsonl"
    # The broken third line is never read when only two examples are asked for.
    path.write_text(json.dumps(litm_record("q1")) + "\n" + json.dumps(litm_record("q2")) + "\n{oops\n")
    assert [e.question for e in load_examples(str(path), limit=2)] == ["q1", "q2"]
    assert next(iter_examples(str(path))).question == "q1"
    with pytest.raises(UserError, match=":3:"):
        load_examples(str(path))


def test_unknown_format_name_is_rejected(tmp_path):
    with pytest.raises(UserError, match="--format"):
        load_examples(write(tmp_path, [litm_record()]), fmt="csv")


@pytest.mark.parametrize(
    "name, kind, distractors",
    [("nq-open-oracle.jsonl.gz", "qa", 0), ("kv-retrieval-75_keys.jsonl.gz", "kv", 74)],
)
def test_real_shared_data_files(name, kind, distractors):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    examples = load_examples(path, limit=5)
    assert len(examples) == 5
    with gzip.open(path, "rt") as fh:
        first = json.loads(fh.readline())
    for example in examples:
        assert example.kind == kind
        assert len(example.distractors) == distractors
        assert example.answers and all(isinstance(a, str) and a for a in example.answers)
    if kind == "qa":
        assert examples[0].gold.text == first["ctxs"][0]["text"]
        assert examples[0].answers == first["answers"]
    else:
        assert examples[0].answers == [first["value"]]
        assert examples[0].gold == Document(first["key"], first["value"])
