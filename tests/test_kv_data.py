import collections
import uuid

import pytest

import prepare_data
from pos2distill.errors import UserError
from pos2distill.formats import load_examples
from pos2distill.jsonl import read_jsonl
from pos2distill.kv_data import generate_kv_records


def test_shape_and_uuid4_strings():
    records = generate_kv_records(num_examples=5, num_keys=7, seed=1)
    assert len(records) == 5
    for record in records:
        assert set(record) == {"ordered_kv_records", "key", "value"}
        pairs = record["ordered_kv_records"]
        assert len(pairs) == 7
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == 7
        assert [record["key"], record["value"]] in pairs
        for text in (item for pair in pairs for item in pair):
            assert uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text


def test_same_seed_same_records_and_other_seed_differs():
    assert generate_kv_records(3, 10, seed=42) == generate_kv_records(3, 10, seed=42)
    assert generate_kv_records(3, 10, seed=42) != generate_kv_records(3, 10, seed=43)


def test_gold_position_is_spread_over_all_positions():
    records = generate_kv_records(num_examples=2000, num_keys=5, seed=0)
    counts = collections.Counter(
        [k for k, _ in r["ordered_kv_records"]].index(r["key"]) for r in records
    )
    assert sorted(counts) == [0, 1, 2, 3, 4]
    # Expected 400 each; a uniform draw stays well inside these bounds.
    assert all(320 < n < 480 for n in counts.values()), counts


@pytest.mark.parametrize("num_examples, num_keys", [(-1, 5), (3, 0)])
def test_bad_sizes_are_user_errors(num_examples, num_keys):
    with pytest.raises(UserError):
        generate_kv_records(num_examples, num_keys, seed=0)


def test_cli_writes_records_the_kv_loader_reads(tmp_path, capsys):
    output = str(tmp_path / "kv.jsonl.gz")
    prepare_data.main(["kv", "--num_keys", "6", "--num_examples", "4", "--seed", "3", "--output", output])
    assert f"wrote 4 records (6 keys each) to {output}" in capsys.readouterr().out
    assert read_jsonl(output) == generate_kv_records(4, 6, seed=3)
    examples = load_examples(output)
    assert [e.kind for e in examples] == ["kv"] * 4
    assert all(e.total_docs == 6 for e in examples)
