"""Adaptive weights over the global batch: 2 gloo processes vs one process on the concatenation."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
LOCAL = 3


def global_batch():
    g = torch.Generator().manual_seed(7)
    batch, width, vocab = WORLD * LOCAL, 4, 13
    student = torch.randn(batch, width, vocab, generator=g)
    teacher = torch.randn(batch, width, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, width), generator=g)
    mask = torch.ones(batch, width)
    mask[1, :2] = 0
    mask[4, :3] = 0
    # rank 0: groups 2, 2 and an anchor; rank 1: groups 2, 5 and an anchor, so groups span ranks
    gold = torch.tensor([2, 2, 0, 5, 2, 0])
    anchor = torch.tensor([False, False, True, False, False, True])
    return student, teacher, labels, mask, gold, anchor


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from kd.losses import DistillationLoss, adaptive_loss, token_kl
    from kd.strategy import KDStrategy
    from kd.train_kd import parse_args

    args = parse_args(["--dataset", "unused", "--pretrain", "unused", "--train_batch_size", "6",
                       "--micro_train_batch_size", "3", "--perserve", "0.7"])
    strategy = KDStrategy(args)
    strategy.setup_distributed()
    assert strategy.world_size == WORLD and strategy.get_rank() == rank

    student, teacher, labels, mask, gold, anchor = global_batch()
    own = slice(rank * LOCAL, (rank + 1) * LOCAL)
    student = student[own].clone().requires_grad_(True)
    loss, weights = adaptive_loss(token_kl(student, teacher[own]), mask[own], gold[own], anchor[own],
                                  perserve=0.7, gather=strategy.all_gather, rank=strategy.get_rank())
    loss.backward()
    mix = DistillationLoss((0, 0, 0, 1), perserve=0.7, gather=strategy.all_gather, rank=strategy.get_rank())
    total = mix(student.detach(), teacher[own], labels[own], mask[own], gold[own], anchor[own])["total"]
    torch.save({"weights": weights, "loss": loss.detach(), "grad": student.grad, "mix": total},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_weights_match_single_process_on_global_batch(tmp_path, monkeypatch):
    from kd.losses import adaptive_loss, adaptive_weights, sample_kl, token_kl

    # The point is gloo on CPU; keep it so on a machine with fewer GPUs than processes too.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    student, teacher, _, mask, gold, anchor = global_batch()
    student.requires_grad_(True)
    tok = token_kl(student, teacher)
    want_w = adaptive_weights(sample_kl(tok, mask), gold, anchor, perserve=0.7)
    want_loss, _ = adaptive_loss(tok, mask, gold, anchor, perserve=0.7)
    want_loss.backward()

    got_w = torch.cat([r["weights"] for r in results])
    assert torch.allclose(got_w, want_w, atol=1e-6)
    # a rank-local computation would differ: the gold-2 group spans both ranks
    kl = sample_kl(tok, mask).detach()
    local_w = torch.cat([adaptive_weights(kl[s], gold[s], anchor[s], perserve=0.7)
                         for s in (slice(0, LOCAL), slice(LOCAL, 2 * LOCAL))])
    assert not torch.allclose(local_w, want_w, atol=1e-3)
    # each rank's loss is its share of the single-process loss, gradients included
    assert sum(r["loss"] for r in results).item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert torch.allclose(torch.cat([r["grad"] for r in results]), student.grad, atol=1e-6)
    assert sum(r["mix"] for r in results).item() == pytest.approx(want_loss.item(), rel=1e-5)
