"""The accuracy guard: a converted or pruned model is deployed only when its validation top-1 stays within a
bound of its reference's on the same split (fp16/int8/OpenVINO against the fp32 ONNX, the pruned network
against the kept branch).

    verdict = guard("int8", accuracy=88.1, reference=90.0, images=5000, bound=0.5)
    verdict.passed, verdict.drop, verdict.reason   # False, 1.9, "int8 loses 1.90 top-1 points on 5000 ..."
    verdict.summary()                              # the figures export records per precision (manifest JSON)
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The guard's judgement of one model."""

    accuracy: float  # validation top-1 of the judged model, %
    reference: float  # validation top-1 of what it is judged against, %
    bound: float  # the most top-1 points it may lose
    drop: float  # reference - accuracy, in points (rounded to 4 decimals); negative when it gained
    reason: str | None  # why it is not deployed; None when it passed

    @property
    def passed(self) -> bool:
        return self.reason is None

    def summary(self) -> dict[str, Any]:
        """The figures export writes into its manifest summary for every lower precision."""
        figures = {"val_accuracy": self.accuracy, "fp32_val_accuracy": self.reference, "drop": self.drop,
                   "max_accuracy_drop": self.bound, "passed": self.passed}
        return figures if self.passed else {**figures, "reason": self.reason}


def guard(what: str, accuracy: float, reference: float, images: int, bound: float, *,
          against: str = "fp32", setting: str = "export.max_accuracy_drop") -> Verdict:
    """Judge `what` (e.g. "int8", "OpenVINO bf16", "the pruned network"): top-1 `accuracy` against
    `reference` (named `against`) on the same `images` validation images; it may lose at most `bound`
    points (the config field `setting`)."""
    drop = round(reference - accuracy, 4)
    reason = None
    if not drop <= bound:  # a NaN drop (no images) is not deployed either
        reason = (f"{what} loses {drop:.2f} top-1 points on {images} validation images ({accuracy:.2f}% vs "
                  f"{against} {reference:.2f}%) > {setting} {bound:g}")
    return Verdict(accuracy=accuracy, reference=reference, bound=bound, drop=drop, reason=reason)
