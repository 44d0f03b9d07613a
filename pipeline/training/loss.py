"""The ONE loss, exactly as the official code computes it (Lan, Zhu & Gong, NeurIPS 2018, arXiv 1806.04606;
code: github.com/Lan1991Xu/ONE_NeurIPS2018):

    L = a * sum_i CE(z_i, y) + b * CE(z_t, y) + c * w(e) * sum_i T^2 * KL(p_t || p_i)

with p = softmax(z / T), the teacher detached in the KL term (the gate learns only through
CE(z_t, y)), KL summed over classes and averaged over the batch, and w(e) the sigmoid ramp-up
exp(-5 (1 - e/R)^2) for e < R, else 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.training.models import ONEOutput


class LossParts(NamedTuple):
    total: torch.Tensor
    branch_ce: torch.Tensor
    teacher_ce: torch.Tensor
    kd: torch.Tensor  # before the ramp weight
    kd_weight: float


def rampup_weight(epoch: float, rampup_epochs: float) -> float:
    """exp(-5 (1 - e/R)^2) for e < R, else 1; `epoch` may be fractional (progress within the run)."""
    if rampup_epochs <= 0 or epoch >= rampup_epochs:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / rampup_epochs) ** 2)


def one_loss(out: ONEOutput, target: torch.Tensor, cfg: LossConfig, epoch: float, epochs: int) -> LossParts:
    branches = out.branches.float()  # (batch, m, classes); float: stable softmax under AMP
    teacher = out.teacher.float()
    m = branches.shape[1]
    T = cfg.temperature
    branch_ce = sum(F.cross_entropy(branches[:, i], target) for i in range(m))
    teacher_ce = F.cross_entropy(teacher, target)
    p_teacher = F.softmax(teacher.detach() / T, dim=1)
    kd = sum(
        F.kl_div(F.log_softmax(branches[:, i] / T, dim=1), p_teacher, reduction="batchmean") for i in range(m)
    ) * T * T
    weight = rampup_weight(epoch, cfg.rampup * epochs)
    total = cfg.branch_ce_weight * branch_ce + cfg.teacher_ce_weight * teacher_ce + cfg.kd_weight * weight * kd
    return LossParts(total, branch_ce, teacher_ce, kd, weight)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor, temperature: float,
                 kd_weight: float) -> torch.Tensor:
    """CE(student, y) + kd_weight * T^2 * KL(p_teacher || p_student); CE alone without a teacher."""
    student = student.float()
    ce = F.cross_entropy(student, target)
    if teacher is None:
        return ce
    T = temperature
    kd = F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher.float() / T, dim=1), reduction="batchmean")
    return ce + kd_weight * T * T * kd
