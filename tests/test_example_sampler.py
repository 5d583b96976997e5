"""kd/example_sampler.py: whole examples per micro-batch, split over processes, resumable."""

import pytest
import torch
from torch.utils.data import DataLoader

from kd.example_sampler import ExampleGroupedSampler, teacher_groups

# 7 examples of 1-5 rows (rows of one example need not be adjacent in the dataset)
GROUPS = [[0, 7, 14], [1, 8], [2, 9, 15, 18, 20], [3], [4, 10, 16], [5, 11, 17, 19], [6, 12, 13]]
ROWS = sum(len(g) for g in GROUPS)  # 21


def example_of(row):
    return next(i for i, g in enumerate(GROUPS) if row in g)


def test_examples_stay_together_and_processes_share_nothing():
    micro, world = 2, 2
    samplers = [ExampleGroupedSampler(GROUPS, micro, world, rank, seed=3) for rank in range(world)]
    per_rank = [list(s) for s in samplers]
    assert [len(rows) for rows in per_rank] == [len(s) for s in samplers] == [10, 10]  # 21 // 4 * 2
    assert not set(per_rank[0]) & set(per_rank[1])
    order = samplers[0].global_order()
    assert sorted(order) == list(range(ROWS))
    # the global order is whole examples one after another
    examples = [example_of(row) for row in order]
    assert len([i for i in range(1, ROWS) if examples[i] != examples[i - 1]]) == len(GROUPS) - 1
    # rank r takes the r-th micro-batch slice of each global micro-batch of micro * world rows
    for rank in range(world):
        expected = [order[s + rank * micro + j] for s in range(0, 20, micro * world) for j in range(micro)]
        assert per_rank[rank] == expected


def test_order_is_seeded_per_epoch_and_resumes_mid_epoch():
    sampler = ExampleGroupedSampler(GROUPS, 3, seed=5)
    first = list(sampler)
    assert list(ExampleGroupedSampler(GROUPS, 3, seed=5)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(ExampleGroupedSampler(GROUPS, 3, seed=6).global_order()[:21])
    sampler.set_epoch(1, consumed_samples=6)  # two micro-batches of 3 done
    assert list(sampler) == second[6:] and len(sampler) == 15


def test_bad_setup():
    with pytest.raises(ValueError):
        ExampleGroupedSampler(GROUPS, 2, num_replicas=2, rank=2)


def test_teacher_groups_by_identical_input():
    inputs = [[1, 2], [3], [1, 2], [4, 5], [3], [1, 2]]
    assert teacher_groups(inputs) == [[0, 2, 5], [1, 4], [3]]


def test_grouped_micro_batches_need_fewer_teacher_rows(tiny_model):
    """Through PairDataset's collate: 5 copies per example, micro-batch 10 -> 2-3 teacher rows, not 10."""
    from kd.pair_dataset import PairDataset
    from pos2distill.models import load_tokenizer

    rows = []
    for example in range(6):
        teacher_docs = [{"title": f"gold {example}", "text": "x"}, {"title": "other", "text": "y"}]
        for copy in range(5):
            rows.append({"question": f"question {example}", "answers": ["x"], "instruction": "", "kind": "qa",
                         "documents": teacher_docs[::-1] if copy % 2 else teacher_docs,
                         "teacher_documents": teacher_docs, "oracle_answer": "x", "gold_idx": copy % 2,
                         "is_anchor": copy == 4})
    rows = rows[::2] + rows[1::2]  # copies spread over the dataset, as after a shuffle
    dataset = PairDataset(rows, load_tokenizer(tiny_model), max_len=512)
    groups = teacher_groups([item["teacher_ids"] for item in dataset.items])
    assert sorted(len(g) for g in groups) == [5] * 6
    grouped = DataLoader(dataset, batch_size=10, sampler=ExampleGroupedSampler(groups, 10, seed=0),
                         collate_fn=dataset.collate_fn)
    teacher_rows = [batch["teacher_input_ids"].shape[0] for batch in grouped]
    assert len(teacher_rows) == 3 and max(teacher_rows) <= 3
    shuffled = DataLoader(dataset, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0),
                          collate_fn=dataset.collate_fn)
    assert sum(batch["teacher_input_ids"].shape[0] for batch in shuffled) > sum(teacher_rows)
