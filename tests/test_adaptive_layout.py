"""The adaptive loss's gradient does not depend on how the global batch of 32 is laid out.

1 process x 32, 2 gloo processes x 16 and 1 process x 8 x 4 accumulation steps give the
reference's gradient (8 GPUs x 4: (1/8) sum over the 32 rows of w_i KL_i), computed here
independently. The micro-batches go through the trainer's own ``micro_batches`` (step-wide
weights); DeepSpeed's reduction (loss / accumulation steps, mean over ranks) is emulated.
"""

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

GLOBAL, WIDTH, DIM, VOCAB, PERSERVE = 32, 5, 6, 11, 0.7


def global_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(GLOBAL, WIDTH, DIM, generator=g)
    teacher = 2 * torch.randn(GLOBAL, WIDTH, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL, WIDTH), generator=g)
    lengths = torch.randint(1, WIDTH + 1, (GLOBAL,), generator=g)  # unequal token counts
    mask = (torch.arange(WIDTH) >= WIDTH - lengths[:, None]).float()
    gold = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (GLOBAL,), generator=g)]
    anchor = torch.rand(GLOBAL, generator=g) < 0.25
    return {"x": x, "teacher": teacher, "labels": labels, "response_mask": mask, "gold_idx": gold, "is_anchor": anchor}


def student():
    torch.manual_seed(11)
    return torch.nn.Linear(DIM, VOCAB, bias=False)


def reference_gradient(scale=1 / 8):
    """(1/8) sum_i w_i KL_i over all 32 rows, from the paper's formula written out here."""
    b, lin = global_batch(), student()
    logq = torch.log_softmax(lin(b["x"]), -1)
    logp = torch.log_softmax(b["teacher"], -1)
    tok = (logp.exp() * (logp - logq)).sum(-1)
    kl = (tok * b["response_mask"]).sum(-1) / b["response_mask"].sum(-1)
    kld = kl.detach().tolist()
    groups = sorted({int(g) for g, a in zip(b["gold_idx"], b["is_anchor"]) if not a})
    members = {p: [i for i in range(GLOBAL) if not b["is_anchor"][i] and int(b["gold_idx"][i]) == p] for p in groups}
    means = {p: sum(kld[i] for i in members[p]) / len(members[p]) for p in groups}
    z = sum(math.exp(m) for m in means.values())
    w = [PERSERVE] * GLOBAL
    for p in groups:
        c = math.exp(means[p]) / z * len(groups)
        peak = max(kld[i] for i in members[p])
        for i in members[p]:
            w[i] = c / len(members[p]) * kld[i] / peak
    (scale * (torch.tensor(w) * kl).sum()).backward()
    return lin.weight.grad.clone()


def layout_gradient(coefs, world, micro, rank=0, gather=None, legacy=False, step_weights=True):
    """This rank's gradient after DeepSpeed's division by the accumulation steps."""
    from kd.losses import DistillationLoss, adaptive_scale
    from kd.trainer import Pos2DistillTrainer

    steps = GLOBAL // (world * micro)
    b, lin = global_batch(), student()
    # rank r's micro-batch a holds rows (a * world + r) * micro ...
    loader = [{k: v[(a * world + rank) * micro:(a * world + rank + 1) * micro] for k, v in b.items()}
              for a in range(steps)]
    objective = DistillationLoss(coefs, perserve=PERSERVE, gather=gather or (lambda t: t), rank=rank,
                                 adaptive_scale=adaptive_scale(micro, legacy))
    trainer = SimpleNamespace(train_dataloader=loader, strategy=SimpleNamespace(device=torch.device("cpu")),
                              objective=objective, step_weights=step_weights and coefs[3] > 0 and steps > 1 and not legacy,
                              _logits=lambda batch: (lin(batch["x"]), batch["teacher"]))
    for batch, weights in Pos2DistillTrainer.micro_batches(trainer, steps):
        out = objective(lin(batch["x"]), batch["teacher"], batch["labels"], batch["response_mask"],
                        batch["gold_idx"], batch["is_anchor"], weights)
        (out["total"] / steps).backward()
    return lin.weight.grad.clone()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from kd.strategy import KDStrategy
    from kd.train_kd import parse_args

    strategy = KDStrategy(parse_args(["--dataset", "unused", "--pretrain", "unused", "--train_batch_size", "32",
                                      "--micro_train_batch_size", "16"]))
    strategy.setup_distributed()
    grads = {}
    for name, coefs in (("adaptive", (0, 0, 0, 1)), ("kd", (1, 0, 0, 0))):
        grad = layout_gradient(coefs, 2, 16, rank, strategy.all_gather)
        torch.distributed.all_reduce(grad)  # DeepSpeed averages the ranks' gradients
        grads[name] = grad / 2
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_adaptive_gradient_is_layout_invariant(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    two_by_16 = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(two_by_16["adaptive"], torch.load(tmp_path / "rank1.pt")["adaptive"])

    want = reference_gradient()
    one_by_32 = layout_gradient((0, 0, 0, 1), 1, 32)
    four_by_8 = layout_gradient((0, 0, 0, 1), 1, 8)
    for got in (one_by_32, two_by_16["adaptive"], four_by_8):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()
    assert want.abs().sum() > 0
    assert torch.allclose(two_by_16["kd"], layout_gradient((1, 0, 0, 0), 1, 32), rtol=1e-5, atol=1e-7)
    # before issue 16: s = 1 at 1 x 32 is 8x the reference; per-micro-batch weights differ too
    assert torch.allclose(layout_gradient((0, 0, 0, 1), 1, 32, legacy=True), 8 * want, rtol=1e-5, atol=1e-6)
    legacy_accumulated = layout_gradient((0, 0, 0, 1), 1, 8, legacy=True)
    assert not torch.allclose(legacy_accumulated, 2 * want, rtol=1e-3)  # s = 1 = 2 x (4/8), other weights


def test_accumulation_needs_step_wide_weights():
    # weights from each micro-batch of 8 alone (the scale right) miss the reference
    alone = layout_gradient((0, 0, 0, 1), 1, 8, step_weights=False)
    assert not torch.allclose(alone, reference_gradient(), rtol=1e-3)


def test_kd_is_layout_invariant_and_lm_only_with_equal_token_counts():
    kd = [layout_gradient((1, 0, 0, 0), 1, micro) for micro in (32, 8, 4)]
    assert all(torch.allclose(g, kd[0], rtol=1e-5, atol=1e-7) for g in kd)
    lm = [layout_gradient((0, 1, 0, 0), 1, micro) for micro in (32, 8)]
    assert not torch.allclose(lm[0], lm[1], rtol=1e-3)  # token means per micro-batch: unequal counts differ
