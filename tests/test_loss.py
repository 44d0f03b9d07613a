import math

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.training.loss import distill_loss, one_loss, rampup_weight
from pipeline.training.models import ModelSpec, ONENet, ONEOutput


def _independent(branches, gate, target, T, w):
    """The formula written out with plain tensor algebra (no F.kl_div / F.cross_entropy)."""
    teacher = (gate[:, :, None] * branches).sum(1)

    def ce(z):
        return (torch.logsumexp(z, 1) - z.gather(1, target[:, None]).squeeze(1)).mean()

    p_t = torch.exp(teacher / T - torch.logsumexp(teacher / T, 1, keepdim=True))
    kd = 0.0
    for i in range(branches.shape[1]):
        log_p_i = branches[:, i] / T - torch.logsumexp(branches[:, i] / T, 1, keepdim=True)
        kd = kd + (p_t * (torch.log(p_t) - log_p_i)).sum(1).mean()
    return sum(ce(branches[:, i]) for i in range(branches.shape[1])) + ce(teacher) + w * T * T * kd


def test_loss_equals_the_formula_computed_independently():
    g = torch.Generator().manual_seed(0)
    branches = torch.randn(6, 3, 5, generator=g) * 3
    gate = torch.softmax(torch.randn(6, 3, generator=g), 1)
    target = torch.randint(0, 5, (6,), generator=g)
    out = ONEOutput(branches, gate, (gate[:, :, None] * branches).sum(1))
    cfg = LossConfig(temperature=3.0, rampup=0.5)
    parts = one_loss(out, target, cfg, epoch=1.0, epochs=10)  # ramp: R = 5, w = exp(-5 * 0.8^2)
    w = math.exp(-5 * 0.8 ** 2)
    assert parts.kd_weight == pytest.approx(w)
    assert parts.total.item() == pytest.approx(_independent(branches, gate, target, 3.0, w).item(), rel=1e-5)
    # a golden value: a change to the formula changes this number
    assert parts.total.item() == pytest.approx(15.86158, rel=1e-4)


def test_rampup_shape():
    assert rampup_weight(0, 80) == pytest.approx(math.exp(-5))
    assert rampup_weight(40, 80) == pytest.approx(math.exp(-1.25))
    assert rampup_weight(80, 80) == rampup_weight(200, 80) == 1.0
    assert rampup_weight(0, 0) == 1.0


def test_kl_term_sends_no_gradient_into_teacher_or_gate():
    torch.manual_seed(0)
    model = ONENet(ModelSpec("resnet20", 10, 3, branches=3, width=4)).train()
    out = model(torch.randn(8, 3, 16, 16))
    target = torch.randint(0, 10, (8,))
    kd_only = LossConfig(branch_ce_weight=0, teacher_ce_weight=0, kd_weight=1, rampup=0)
    one_loss(out, target, kd_only, epoch=0, epochs=1).total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.gate.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.branches.parameters())
    model.zero_grad()
    out = model(torch.randn(8, 3, 16, 16))
    teacher_only = LossConfig(branch_ce_weight=0, teacher_ce_weight=1, kd_weight=0)
    one_loss(out, target, teacher_only, epoch=0, epochs=1).total.backward()
    assert any(p.grad is not None and p.grad.any() for p in model.gate.parameters())


def test_distill_loss_is_ce_plus_the_tempered_kl_and_ce_alone_without_a_teacher():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    target = torch.randint(0, 5, (6,), generator=g)
    T, weight = 4.0, 0.7
    ce = (torch.logsumexp(student, 1) - student.gather(1, target[:, None]).squeeze(1)).mean()
    p_t = torch.softmax(teacher / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / T, 1))).sum(1).mean()
    assert distill_loss(student, None, target, T, weight).item() == pytest.approx(ce.item(), rel=1e-6)
    got = distill_loss(student, teacher, target, T, weight).item()
    assert got == pytest.approx((ce + weight * T * T * kl).item(), rel=1e-5)
    assert got > ce.item() + 0.1  # the teacher counts: these logits disagree
