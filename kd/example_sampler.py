"""Batches that keep the copies of one example together (``--group_by_example``).

Stage 2 turns each example into K + strengthen rows that share one teacher input (the gold
document at the advantageous position). The collate runs the teacher once per *distinct*
teacher input of a micro-batch, but the default sampler shuffles rows, so copies rarely meet
and the teacher runs once per row. This sampler shuffles whole examples instead and lays
their rows side by side, so a micro-batch of 32 five-row examples needs about 7-8 teacher
rows instead of 32.

It changes what a micro-batch holds: fewer distinct examples, each at several positions.
The per-row losses (kd, lm, rank) only see a different batch mix; the adaptive loss's
statistics per gold position are taken over fewer examples. That is why it is opt-in.
"""

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ExampleGroupedSampler(Sampler[int]):
    """Seeded order of whole examples, split into per-process micro-batches.

    ``groups``: the dataset indices of each example (rows sharing a teacher input). Each
    epoch shuffles the examples (``seed + epoch``), concatenates their rows and cuts the order
    into global micro-batches of ``micro_batch_size * num_replicas`` rows; process ``rank``
    takes its contiguous ``micro_batch_size`` slice of each, so its micro-batch holds whole
    examples except at the slice edges. The tail that fills no global micro-batch is dropped.
    ``set_epoch(epoch, consumed_samples)`` mirrors OpenRLHF's DistributedSampler for resuming.
    """

    def __init__(self, groups: Sequence[Sequence[int]], micro_batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        if micro_batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler set-up: micro {micro_batch_size}, rank {rank} of {num_replicas}")
        self.groups = [list(group) for group in groups if len(group)]
        self.micro = micro_batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.consumed = 0
        rows = sum(len(group) for group in self.groups)
        self.num_samples = rows // (micro_batch_size * num_replicas) * micro_batch_size  # per process

    def set_epoch(self, epoch: int, consumed_samples: int = 0) -> None:
        self.epoch = epoch
        self.consumed = consumed_samples // self.num_replicas  # rows of this process already used

    def global_order(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return [row for g in torch.randperm(len(self.groups), generator=generator).tolist() for row in self.groups[g]]

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        step = self.micro * self.num_replicas
        mine = [row for start in range(0, self.num_samples // self.micro * step, step)
                for row in order[start + self.rank * self.micro: start + (self.rank + 1) * self.micro]]
        return iter(mine[self.consumed:])

    def __len__(self) -> int:
        return self.num_samples - self.consumed


def teacher_groups(teacher_inputs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Dataset indices grouped by identical teacher input, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for index, ids in enumerate(teacher_inputs):
        groups.setdefault(tuple(ids), []).append(index)
    return list(groups.values())
