"""kd/losses.py against independent computations (numpy / explicit loops) on small tensors."""

import math

import numpy as np
import pytest
import torch

from kd.losses import (
    DistillationLoss,
    adaptive_loss,
    adaptive_weights,
    kd_loss,
    lm_loss,
    rank_loss,
    response_logits,
    sample_kl,
    token_kl,
)


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(p_logits, q_logits, temperature=1.0):
    p = np_softmax(np.asarray(p_logits) / temperature)
    q = np_softmax(np.asarray(q_logits) / temperature)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def random_case(batch=3, width=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, width, vocab, generator=g) * 2
    teacher = torch.randn(batch, width, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (batch, width), generator=g)
    # right-aligned responses of lengths 5, 2 and 3; the rest is padding
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.float)[:batch, :width]
    return student, teacher, labels, mask


def response_tokens(mask_row):
    return [k for k, m in enumerate(mask_row.tolist()) if m]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_kl_matches_numpy(temperature):
    student, teacher, _, _ = random_case()
    got = token_kl(student, teacher, temperature)
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            want = np_kl(teacher[b, t].numpy(), student[b, t].numpy(), temperature)
            assert got[b, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kd_loss_decay_weights_and_padding():
    student, teacher, _, mask = random_case()
    got = kd_loss(token_kl(student, teacher), mask)
    per_sample = []
    for b in range(student.shape[0]):
        slots = response_tokens(mask[b])
        terms = [3 * 0.99**t * np_kl(teacher[b, k].numpy(), student[b, k].numpy()) for t, k in enumerate(slots)]
        per_sample.append(sum(terms) / len(terms))
    assert got.item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)


def test_kd_loss_ignores_samples_without_tokens():
    student, teacher, _, mask = random_case()
    mask[1] = 0
    got = kd_loss(token_kl(student, teacher), mask)
    want = kd_loss(token_kl(student[[0, 2]], teacher[[0, 2]]), mask[[0, 2]])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_padding_content_does_not_matter():
    student, teacher, labels, mask = random_case()
    student2, teacher2 = student.clone(), teacher.clone()
    student2[mask == 0] = 1e4 * torch.randn_like(student2[mask == 0])
    teacher2[mask == 0] = float("nan")
    labels2 = labels.masked_fill(mask == 0, -100)
    for fn in (
        lambda s, t, y: kd_loss(token_kl(s, t), mask),
        lambda s, t, y: lm_loss(s, y, mask),
        lambda s, t, y: rank_loss(s, t, mask, top_k=4),
    ):
        a, b = fn(student, teacher, labels), fn(student2, teacher2, labels2)
        assert torch.isfinite(b) and a.item() == pytest.approx(b.item(), rel=1e-6)


def test_lm_loss_matches_explicit_cross_entropy():
    student, _, labels, mask = random_case()
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for k in response_tokens(mask[b]):
            total -= math.log(np_softmax(student[b, k].numpy())[labels[b, k]])
            count += 1
    assert lm_loss(student, labels, mask).item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("top_k,temperature", [(3, 1.0), (5, 0.5), (20, 1.0)])
def test_rank_loss_matches_numpy(top_k, temperature):
    student, teacher, _, mask = random_case(vocab=30, seed=3)
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for k in response_tokens(mask[b]):
            t_row, s_row = teacher[b, k].numpy(), student[b, k].numpy()
            ids = np.argsort(-t_row, kind="stable")[:top_k]
            total += np_kl(t_row[ids], s_row[ids], temperature)
            count += 1
    got = rank_loss(student, teacher, mask, top_k=top_k, temperature=temperature)
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_adaptive_weights_hand_computed():
    kl = torch.tensor([0.2, 0.4, 1.0, 0.5, 0.3, 0.7])
    gold = torch.tensor([3, 3, 7, 0, 7, 3])
    anchor = torch.tensor([False, False, False, True, False, True])
    w = adaptive_weights(kl, gold, anchor, perserve=0.5)
    # groups among the trivial samples: gold 3 -> {0: .2, 1: .4}, gold 7 -> {2: 1.0, 4: .3}
    m3, m7 = 0.3, 0.65
    c3 = 2 * math.exp(m3) / (math.exp(m3) + math.exp(m7))
    c7 = 2 * math.exp(m7) / (math.exp(m3) + math.exp(m7))
    want = [c3 / 2 * 0.2 / 0.4, c3 / 2 * 1.0, c7 / 2 * 1.0, 0.5, c7 / 2 * 0.3 / 1.0, 0.5]
    assert w.tolist() == pytest.approx(want, rel=1e-6)


def test_adaptive_weights_single_group_and_only_anchors():
    w = adaptive_weights(torch.tensor([0.1, 0.3]), torch.tensor([5, 5]), torch.tensor([False, False]))
    assert w.tolist() == pytest.approx([1 / 2 * 0.1 / 0.3, 1 / 2], rel=1e-6)
    w = adaptive_weights(torch.tensor([0.1, 0.3]), torch.tensor([0, 0]), torch.tensor([True, True]), perserve=2.0)
    assert w.tolist() == [2.0, 2.0]


def test_adaptive_weights_zero_kl_group_is_not_nan():
    w = adaptive_weights(torch.tensor([0.0, 0.0, 0.4]), torch.tensor([1, 1, 2]), torch.tensor([False, False, False]))
    assert torch.isfinite(w).all()
    assert w[:2].tolist() == [0.0, 0.0]
    assert w[2].item() == pytest.approx(2 * math.exp(0.4) / (1 + math.exp(0.4)), rel=1e-6)


def test_adaptive_weights_skip_samples_without_tokens():
    kl = torch.tensor([0.2, 0.4, 0.0])
    gold = torch.tensor([1, 1, 1])
    anchor = torch.tensor([False, False, True])
    w = adaptive_weights(kl, gold, anchor, valid=torch.tensor([True, False, False]))
    assert w.tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_adaptive_loss_value_and_constant_weights():
    student, teacher, _, mask = random_case()
    student.requires_grad_(True)
    gold = torch.tensor([4, 4, 9])
    anchor = torch.tensor([False, False, False])
    loss, w = adaptive_loss(token_kl(student, teacher), mask, gold, anchor)
    kl = [np.mean([np_kl(teacher[b, k].numpy(), student[b, k].detach().numpy()) for k in response_tokens(mask[b])])
          for b in range(3)]
    c = np.array([np.exp((kl[0] + kl[1]) / 2), np.exp(kl[2])])
    c = 2 * c / c.sum()
    want_w = [c[0] / 2 * kl[0] / max(kl[:2]), c[0] / 2 * kl[1] / max(kl[:2]), c[1]]
    assert w.tolist() == pytest.approx(want_w, rel=1e-5)
    assert loss.item() == pytest.approx(sum(wi * ki for wi, ki in zip(want_w, kl)), rel=1e-5)
    # The weights are constants: d loss / d student = sum_i w_i d KL_i / d student.
    loss.backward()
    manual = student.detach().clone().requires_grad_(True)
    (w.detach() * sample_kl(token_kl(manual, teacher), mask)).sum().backward()
    assert torch.allclose(student.grad, manual.grad, atol=1e-7)


def test_kl_numerically_safe_with_inf_and_huge_logits():
    vocab = 6
    teacher = torch.zeros(2, 2, vocab)
    teacher[0, 0] = torch.tensor([float("-inf"), 1.0, 2.0, float("-inf"), 0.0, 0.5])
    teacher[0, 1] = torch.tensor([1e30, 0.0, -1e30, 0.0, 3.0, 2.0])
    teacher[1, 0] = torch.tensor([200.0, -200.0, 0.0, 0.0, 0.0, 0.0])  # exp underflows to exactly 0
    teacher[1, 1] = torch.tensor([float("-inf")] * 5 + [0.0])
    student = torch.randn(2, 2, vocab)
    student[1, 1, 0] = float("-inf")  # impossible for the student where the teacher is impossible too
    student.requires_grad_(True)
    tok = token_kl(student, teacher)
    assert torch.isfinite(tok).all()
    for b in range(2):
        for t in range(2):
            p = torch.softmax(teacher[b, t].double(), -1)
            logq = torch.log_softmax(student[b, t].detach().double(), -1)
            want = sum(p[v] * (math.log(p[v]) - logq[v]) for v in range(vocab) if p[v] > 0)
            assert tok[b, t].item() == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    mask = torch.ones(2, 2)
    total = kd_loss(tok, mask) + adaptive_loss(tok, mask, torch.tensor([1, 2]), torch.tensor([False, False]))[0]
    total = total + rank_loss(student, teacher, mask, top_k=4)
    total.backward()
    assert torch.isfinite(student.grad).all()


def test_bf16_logits_are_upcast():
    student, teacher, labels, mask = random_case()
    loss = DistillationLoss((1, 1, 1, 1))(student.bfloat16(), teacher.bfloat16(), labels, mask,
                                          torch.tensor([1, 2, 2]), torch.tensor([True, False, False]))
    assert loss["total"].dtype == torch.float32
    ref = DistillationLoss((1, 1, 1, 1))(student.bfloat16().float(), teacher.bfloat16().float(), labels, mask,
                                         torch.tensor([1, 2, 2]), torch.tensor([True, False, False]))
    assert loss["total"].item() == pytest.approx(ref["total"].item(), rel=1e-6)


def test_mix_is_weighted_sum_and_zero_terms_have_no_grad():
    student, teacher, labels, mask = random_case()
    gold, anchor = torch.tensor([1, 2, 2]), torch.tensor([True, False, False])
    out = DistillationLoss((0.5, 2.0, 0.0, 3.0))(student.requires_grad_(True), teacher, labels, mask, gold, anchor)
    want = 0.5 * out["kd"] + 2.0 * out["lm"] + 3.0 * out["adaptive"]
    assert out["total"].item() == pytest.approx(want.item(), rel=1e-6)
    assert not out["rank"].requires_grad and out["total"].requires_grad
    adaptive_only = DistillationLoss((0, 0, 0, 1))(student, teacher, labels, mask, gold, anchor)
    assert adaptive_only["total"].item() == pytest.approx(adaptive_only["adaptive"].item())
    assert not adaptive_only["lm"].requires_grad


class PreviousTokenModel(torch.nn.Module):
    """Fake causal LM: the output at position s is one-hot(input_ids[s]), honouring logits_to_keep."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=None):
        logits = torch.nn.functional.one_hot(input_ids, self.vocab).float()
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Output", (), {"logits": logits})()


def test_response_logits_takes_the_position_before_each_token():
    # left-padded rows: pad=0; prompt ids 10.., response ids 20..; the response is the tail
    ids = torch.tensor([[0, 0, 11, 12, 21, 22], [11, 12, 13, 21, 22, 23]])
    mask = (ids != 0).long()
    logits = response_logits(PreviousTokenModel(30), ids, mask, width=3)
    assert logits.shape == (2, 3, 30)
    # slot k predicts token S-3+k; its distribution must come from position S-3+k-1
    assert logits.argmax(-1).tolist() == [[11, 12, 21], [13, 21, 22]]


def test_response_logits_match_unpadded_full_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    from kd.pair_dataset import pad_before_tail

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    rows = [[5, 17, 99, 1000, 42, 7], [8, 300, 12, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    lengths = [3, 2, 1]  # response lengths
    width = max(lengths)
    ids, mask = pad_before_tail(rows, [n + 1 for n in lengths], pad_id=0)
    assert mask[:, 0].all()  # no row starts with padding: no query row is fully masked
    with torch.no_grad():
        got = response_logits(model, ids, mask, width)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            full = model(torch.tensor([row])).logits[0]
            start = len(row) - n
            for t in range(n):
                slot = width - n + t
                assert torch.allclose(got[b, slot], full[start + t - 1], atol=1e-4), (b, t)
