"""Is a difference in test top-1 real? One paired t-test (runs with the same seed share the shuffling and
augmentation, and every run the images and their labels) and Welch's t-test on two groups, both with their
95% confidence interval and a verdict in words. The edge cases are decided here, once, for every caller:
fewer than 2 pairs (or 2 per group) and zero spread give no p-value and no interval, only a verdict that
says why; no pair at all gives no difference either."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import numpy as np
from scipy import stats

SIGNIFICANCE = 0.05  # two-sided p below this: the difference is called real


def gain(treated: dict[str, float], control: dict[str, float]) -> dict[str, Any]:
    """The kept branch's gain over vanilla (test top-1 per seed, keyed by seed): the paired test decides
    when at least 2 seeds pair up, else Welch's. The chosen test's figures at the top, both beside."""
    both = {"paired": paired(treated, control), "welch": welch(list(treated.values()), list(control.values()))}
    chosen = both["paired"] if both["paired"]["n"] >= 2 else both["welch"]
    return {**{k: chosen[k] for k in ("test", "diff", "p", "ci95", "verdict")}, **both}


def paired(treated: dict[Any, float], control: dict[Any, float]) -> dict[str, Any]:
    """Per-seed differences (treated - control, in points) over the seeds both sides ran, their mean and
    spread, the paired t-test's two-sided p-value (scipy's ttest_rel) and its 95% confidence interval."""
    seeds = [s for s in treated if s in control]
    diffs = [treated[s] - control[s] for s in seeds]
    figures: dict[str, Any] = {"test": "paired t-test", "per_seed": dict(zip(seeds, diffs)),
                               "diff": statistics.mean(diffs) if diffs else None,
                               "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                               "p": None, "ci95": None, "n": len(seeds)}
    if len(seeds) < 2:
        return {**figures, "verdict": f"{len(seeds)} seed(s) run by both methods: no paired figure; run both "
                                      "with the same seeds, at least 2 (--seeds 0,1,2)"}
    if figures["sd"] == 0:  # ttest_rel would call an identical difference on every seed infinitely certain
        return {**figures, "verdict": f"{figures['diff']:+.2f} points on every seed: no significance figure"}
    return _judged(figures, stats.ttest_rel([treated[s] for s in seeds], [control[s] for s in seeds]),
                   f"{len(seeds)} paired seeds")


def welch(treated: Sequence[float], control: Sequence[float]) -> dict[str, Any]:
    """Mean difference (treated - control, in points), Welch's t-test p-value (two-sided) and its 95%
    confidence interval, and the verdict in words."""
    diff = statistics.mean(treated) - statistics.mean(control)
    figures: dict[str, Any] = {"test": "Welch's t-test", "diff": diff, "p": None, "ci95": None,
                               "n": [len(treated), len(control)]}
    if min(len(treated), len(control)) < 2:
        return {**figures, "verdict": f"{diff:+.2f} points with one seed per method: no significance figure; run "
                                      "with at least 2 seeds (--seeds 0,1,2)"}
    return _judged(figures, stats.ttest_ind(treated, control, equal_var=False),
                   f"{len(treated)} vs {len(control)} seeds")


def significant(figures: dict[str, Any]) -> bool:
    """A p-value below SIGNIFICANCE (never when the test gave none)."""
    return figures["p"] is not None and figures["p"] < SIGNIFICANCE


def _judged(figures: dict[str, Any], test: Any, counted: str) -> dict[str, Any]:
    """A scipy t-test's result as p, 95% CI and the verdict in words."""
    diff, p = figures["diff"], float(test.pvalue)
    if not np.isfinite(p):  # no spread at all on either side: a t-test has nothing to measure
        return {**figures, "verdict": f"{diff:+.2f} points, with no spread between seeds: no significance figure"}
    ci = test.confidence_interval(0.95)
    figures = {**figures, "p": p, "ci95": [float(ci.low), float(ci.high)]}
    where = f"{diff:+.2f} points (95% CI {ci.low:+.2f} to {ci.high:+.2f}; {figures['test']} p = {p:.3g}, {counted})"
    if p >= SIGNIFICANCE:
        return {**figures, "verdict": f"not distinguishable at this budget: {where}"}
    return {**figures, "verdict": f"{'better' if diff > 0 else 'worse'} than the network trained alone: {where}"}
