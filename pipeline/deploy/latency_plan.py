"""The latency planner: which residual widths, inner widths and blocks per stage make the kept branch meet
a latency target on this host, measured rather than predicted from FLOPs (NetAdapt, Yang et al., ECCV 2018:
at equal measured latency, planning on measured latency beat planning on MACs).

    space = PlanSpace(branch.spec, geometry, multiple=16)
    result = Search(space, clock, Target(speedup=2.0), budget=40).run()
    result.chosen.shape, result.chosen.speedup, result.candidates      # every plan it timed

The space: each stage's residual width and its blocks' inner width (multiples of `multiple`, or the
original width, as `prune.plan_widths` plans them) and how many residual blocks the stage keeps (1 to the
architecture's; at batch 1 a small ResNet's time is mostly per-layer cost, which thinner layers do not cut).
The clock (pipeline/deploy/plan_timing.py, or a fake in tests) times plans in interleaved rounds with the
kept branch in every round; a plan's speed-up is the median over rounds of the branch's time / its time.
At most `budget` plans are built and timed; on 2 shared cores one timing of a sub-millisecond network moves
by up to 2x, so every figure is pooled over rounds and the winner is timed again:

1. reach: the smallest plan beside the kept branch; a target it misses is out of reach.
2. probe: each knob alone one step down and at its least (what each costs and saves).
3. refine: a least-squares fit of the measured times on blocks per stage and FLOPs (per-layer cost and
   compute) ranks the plans not yet timed that keep more capacity than the best so far (every plan of a space
   of up to SPACE_LIMIT, else a seeded sample and the best's neighbours); the REFINE_WIDTH widest the fit
   expects to meet the target are timed, the fit is redone, until none is left or the budget is spent.
4. repeat: plans within CLOSE of the target are timed again (REPEAT_ROUNDS), pooled with what they had.
5. confirm: every plan meeting the target is timed again beside the branch (CONFIRM_ROUNDS) and judged on
   those rounds alone; the misses drop out and steps 3 to 5 run again from the best confirmed plan, until
   nothing wider meets the target (at most CONFIRM_TRIES passes).

The best: among the plans meeting the target, the one keeping the most parameters (then FLOPs). Params are
the capacity proxy because they predicted the fine-tuned accuracy where FLOPs did not: at batch 1 the
planner buys speed with blocks, and which blocks go is what the proxy decides. FLOPs weigh every layer by
its pixels, so they spend the last stage's blocks (7x7 pixels, three quarters of the weights) first; on the
quickstart's branch every plan keeping one last-stage block lost 0.5 to 0.8 validation or test points after
the fine-tune, every plan keeping all three at most 0.17, at 2.17x as well (docs/results/capacity_proxy.json).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
import time
from typing import Callable

import numpy as np

from pipeline.training import prune
from pipeline.training.models import ModelSpec, SingleNet, stage_layout

Shape = tuple[int, ...]  # residual width per stage, then inner width per stage, then blocks per stage
Clock = Callable[[list[Shape], int], dict[Shape, list[float]]]  # plans, rounds -> each plan's p50 ms per round

ROUNDS = 3  # rounds per reach, probe or refine step
REPEAT_ROUNDS = 5
CONFIRM_ROUNDS = 7
CONFIRM_TRIES = 3
CLOSE = 0.10  # plans within 10% of the target are timed again; the fit's margin is half of it
REFINE_WIDTH = 4  # plans timed per refine step
SPACE_LIMIT = 20_000  # a space of at most this many plans is ranked whole by the refine's fit


class PlanSpace:
    """Every plan of one network: per stage, a residual width, an inner width and a block count."""

    def __init__(self, spec: ModelSpec, geometry: dict[str, int], multiple: int, depth: bool = True):
        widths, blocks = stage_layout(spec)
        self.spec, self.geometry, self.stages = spec, geometry, len(widths)
        steps = [sorted({*range(multiple, w + 1, multiple), w}) for w in widths]
        self.values = steps + steps + [list(range(1, blocks + 1)) if depth else [blocks]] * len(widths)
        self._params: dict[Shape, int] = {}
        self._flops: dict[Shape, int] = {}

    def full(self) -> Shape:
        return tuple(v[-1] for v in self.values)

    def smallest(self) -> Shape:
        return tuple(v[0] for v in self.values)

    def moves(self, shape: Shape, direction: int) -> list[Shape]:
        """The plans one step smaller (direction -1) or larger (+1) in one knob."""
        found = []
        for i, value in enumerate(shape):
            j = self.values[i].index(value) + direction
            if 0 <= j < len(self.values[i]):
                found.append((*shape[:i], self.values[i][j], *shape[i + 1:]))
        return found

    def every(self) -> list[Shape]:
        """Every plan of the space where there are at most SPACE_LIMIT, else a seeded sample of that many."""
        if math.prod(len(v) for v in self.values) <= SPACE_LIMIT:
            return list(itertools.product(*self.values))
        pick = random.Random(0)
        return list(dict.fromkeys(tuple(pick.choice(v) for v in self.values) for _ in range(SPACE_LIMIT)))

    def flops(self, shape: Shape) -> int:
        if shape not in self._flops:
            self._flops[shape] = prune.plan_flops(self.spec, self.geometry, *self.parts(shape))
        return self._flops[shape]

    def plan(self, shape: Shape) -> prune.Plan:
        stage, inner, blocks = self.parts(shape)
        return prune.Plan(stage, inner, self.flops(shape), self.flops(self.full()), blocks)

    def network(self, shape: Shape) -> SingleNet:
        """A freshly initialised network of this plan (its latency does not depend on its weights)."""
        return SingleNet(self.plan(shape).spec(self.spec)).eval()

    def params(self, shape: Shape) -> int:
        if shape not in self._params:
            self._params[shape] = prune.plan_params(self.spec, *self.parts(shape))
        return self._params[shape]

    def capacity(self, shape: Shape) -> tuple[int, int]:
        """What the planner keeps the most of among the plans meeting the target: params, then FLOPs."""
        return self.params(shape), self.flops(shape)

    def label(self, shape: Shape) -> str:
        return "/".join("-".join(map(str, part)) for part in self.parts(shape))

    def parts(self, shape: Shape) -> tuple[Shape, Shape, Shape]:
        """(residual widths, inner widths, blocks), each per stage."""
        s = self.stages
        return shape[:s], shape[s:2 * s], shape[2 * s:]


@dataclasses.dataclass
class Candidate:
    shape: Shape
    flops: int
    params: int
    phase: str  # where it was first timed: reach, descent, refine
    round_ms: list[float] = dataclasses.field(default_factory=list)
    round_speedups: list[float] = dataclasses.field(default_factory=list)  # branch time / its time, per round
    confirmed: bool | None = None  # timed again as the best, in rounds of its own: did those meet the target?
    confirmation: tuple[float, float] | None = None  # those rounds' speed-up and p50 ms

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.round_ms)

    @property
    def speedup(self) -> float:
        return statistics.median(self.round_speedups)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.params, self.flops


@dataclasses.dataclass(frozen=True)
class Target:
    speedup: float | None = None
    ms: float | None = None

    def met_by(self, candidate: Candidate) -> bool:
        return self.meets(candidate.speedup, candidate.p50_ms)

    def meets(self, speedup: float, p50_ms: float) -> bool:
        return speedup >= self.speedup if self.speedup is not None else p50_ms <= self.ms

    def gap(self, candidate: Candidate) -> float:
        """How far past the target (>= 0: meets it), relative to the target."""
        if self.speedup is not None:
            return candidate.speedup / self.speedup - 1
        return self.ms / candidate.p50_ms - 1

    def describe(self) -> str:
        return f"{self.speedup:g}x" if self.speedup is not None else f"{self.ms:g} ms"


def choose(candidates: list[Candidate], target: Target) -> Candidate | None:
    """Among the candidates meeting the target, the one keeping the most capacity (params, then FLOPs; then
    the faster)."""
    return widest([c for c in candidates if target.met_by(c)])


def widest(candidates: list[Candidate]) -> Candidate | None:
    """The candidate keeping the most capacity (then the faster); None when there is none."""
    return max(candidates, key=lambda c: (*c.capacity, c.speedup), default=None)


class OutOfReach(Exception):
    """No plan meets the target; `fastest` is the fastest one measured."""

    def __init__(self, fastest: Candidate, base: Candidate):
        super().__init__(f"fastest measured plan: {fastest.speedup:.2f}x")
        self.fastest, self.base = fastest, base


@dataclasses.dataclass
class Result:
    chosen: Candidate
    base: Candidate
    candidates: list[Candidate]
    seconds: float
    budget_spent: bool  # the search stopped for want of candidates, not because it was done


class Search:
    def __init__(self, space: PlanSpace, clock: Clock, target: Target, budget: int,
                 log: Callable[[str], None] = lambda line: None):
        self.space, self.clock, self.target, self.budget, self.log = space, clock, target, max(budget, 2), log
        self.base_shape = space.full()
        self.candidates: dict[Shape, Candidate] = {}
        self.rejected: set[Shape] = set()  # met the target, then missed it when confirmed
        self.budget_spent = False

    def time(self, shapes: list[Shape], rounds: int, phase: str) -> dict[Shape, list[float]]:
        """Time `shapes` beside the kept branch in `rounds` interleaved rounds and pool the figures; returns
        these rounds' p50s."""
        shapes = [s for s in dict.fromkeys([self.base_shape, *shapes])]
        per_round = self.clock(shapes, rounds)
        for shape in shapes:
            if shape not in self.candidates:
                plan = self.space.plan(shape)
                self.candidates[shape] = Candidate(shape, plan.flops, self.space.params(shape), phase)
            candidate = self.candidates[shape]
            candidate.round_ms += per_round[shape]
            candidate.round_speedups += [b / t for b, t in zip(per_round[self.base_shape], per_round[shape])]
        return per_round

    def affordable(self, shapes: list[Shape]) -> list[Shape]:
        """The plans of `shapes` the candidate budget still allows (timed ones are free); a cut one spends it."""
        new = [s for s in shapes if s not in self.candidates]
        room = self.budget - len(self.candidates)
        if len(new) > room:
            self.budget_spent = True
            # the largest cuts first: when the budget is short, reaching the target matters most
            new = sorted(new, key=self.space.capacity)[:max(room, 0)]
        return [s for s in shapes if s in self.candidates or s in new]

    def best(self) -> Candidate | None:
        """The widest of the plans not rejected, a confirmed one meeting the target on its confirmation."""
        meeting = [c for c in self.candidates.values()
                   if c.shape not in self.rejected and (c.confirmed or self.target.met_by(c))]
        return widest(meeting)

    def run(self) -> Result:
        started = time.perf_counter()
        self.time([self.space.smallest()], ROUNDS, "reach")
        base = self.candidates[self.base_shape]
        if self.target.ms is not None and self.target.met_by(base):
            return Result(base, base, list(self.candidates.values()), time.perf_counter() - started, False)
        if not self.target.met_by(self.candidates[self.space.smallest()]):
            raise OutOfReach(self.fastest(), base)
        self.time(self.affordable(self.probes()), ROUNDS, "probe")
        self.log(f"probed {len(self.candidates) - 2} plans, one knob each; best so far "
                 f"{self.space.label(self.best().shape)}")
        self.refine()
        self.repeat_close()
        chosen = self.confirm()
        return Result(chosen, base, list(self.candidates.values()), time.perf_counter() - started,
                      self.budget_spent)

    def fastest(self) -> Candidate:
        return max((c for c in self.candidates.values() if c.shape != self.base_shape), key=lambda c: c.speedup)

    def probes(self) -> list[Shape]:
        """The kept branch with one knob one step down, and with one knob at its least."""
        full, values = self.base_shape, self.space.values
        found = self.space.moves(full, -1)
        found += [(*full[:i], values[i][0], *full[i + 1:]) for i in range(len(full)) if len(values[i]) > 2]
        return list(dict.fromkeys(found))

    def refine(self) -> None:
        """Plans keeping more capacity than the best, the REFINE_WIDTH widest the fit expects to meet the target
        (then those within its margin, one step in a row), until none is left or the budget is spent."""
        marginal = False
        while (best := self.best()) is not None:
            wider = [s for s in dict.fromkeys([*self.space.every(), *self.around(best.shape)])
                     if s not in self.candidates and self.space.capacity(s) > best.capacity]
            expected = self.expected_speedups(wider)
            hopeful = [s for s in wider if self.hopeful(expected[s], best, 0)]
            if not hopeful and marginal:
                return  # the margin was tried and gave nothing
            marginal = not hopeful
            if marginal:  # none expected to meet the target: those within its margin
                hopeful = [s for s in wider if self.hopeful(expected[s], best, CLOSE / 2)]
            batch = self.affordable(sorted(hopeful, key=self.space.capacity, reverse=True)[:REFINE_WIDTH])
            if not batch:
                return
            self.time([best.shape, *batch], ROUNDS, "refine")
            self.log(f"refine from {self.space.label(best.shape)}: {len(batch)} wider plans, "
                     f"{sum(self.target.met_by(self.candidates[s]) for s in batch)} meeting the target")
            if self.best() is not best:
                marginal = False

    def around(self, shape: Shape) -> list[Shape]:
        """One knob a step up, alone or with another a step down."""
        found = []
        for up in self.space.moves(shape, +1):
            found += [up, *(s for s in self.space.moves(up, -1) if s != shape)]
        return list(dict.fromkeys(found))

    def expected_speedups(self, shapes: list[Shape]) -> dict[Shape, float]:
        """A least-squares fit of the measured plans' time (share of the kept branch's) on their blocks per
        stage and FLOPs: per-layer cost and compute, which is what a small network's batch-1 time is made of."""
        measured = list(self.candidates.values())
        features = np.array([self.features(c.shape) for c in measured])
        times = np.array([1 / c.speedup for c in measured])
        weights = np.linalg.lstsq(features, times, rcond=None)[0]
        return {s: 1 / max(float(np.dot(self.features(s), weights)), 1e-6) for s in shapes}

    def features(self, shape: Shape) -> list[float]:
        blocks = self.space.parts(shape)[2]
        return [1.0, *map(float, blocks), self.space.flops(shape) / self.candidates[self.base_shape].flops]

    def hopeful(self, speedup: float, best: Candidate, margin: float) -> bool:
        """Whether a plan expected to run `speedup` times faster than the kept branch meets the target,
        give or take `margin` (a share of the target)."""
        if self.target.speedup is not None:
            return speedup >= self.target.speedup * (1 - margin)
        return best.p50_ms * best.speedup / speedup <= self.target.ms * (1 + margin)

    def repeat_close(self) -> None:
        close = [c.shape for c in self.candidates.values()
                 if c.shape != self.base_shape and abs(self.target.gap(c)) <= CLOSE]
        if close:
            self.time(close, REPEAT_ROUNDS, "repeat")
            self.log(f"repeated {len(close)} plans within {CLOSE:.0%} of the target")

    def confirm(self) -> Candidate:
        """Every plan meeting the target timed again together (CONFIRM_ROUNDS) and judged on those rounds alone;
        the misses drop out, and the refine and repeat run again from the best confirmed plan (a few noisy rounds
        can make many plans read fast, and rejecting them must not leave only the smallest plan), until the
        best is confirmed and nothing wider meets the target, or CONFIRM_TRIES passes are done."""
        for _ in range(CONFIRM_TRIES):
            self.confirm_meeting()
            confirmed = self.best()
            if confirmed is None:
                break
            timed = len(self.candidates)
            self.refine()
            if len(self.candidates) == timed:  # nothing wider to try
                return confirmed
            self.repeat_close()
            if self.best() is confirmed:
                return confirmed
        self.confirm_meeting()
        if (best := self.best()) is None:
            raise OutOfReach(self.fastest(), self.candidates[self.base_shape])
        return best

    def confirm_meeting(self) -> None:
        waiting = [c for c in self.candidates.values() if c.confirmed is None and c.shape != self.base_shape
                   and self.target.met_by(c)]
        if not waiting:
            return
        per_round = self.time([c.shape for c in waiting], CONFIRM_ROUNDS, "confirm")
        for c in waiting:
            c.confirmation = (statistics.median(b / t for b, t in zip(per_round[self.base_shape], per_round[c.shape])),
                              statistics.median(per_round[c.shape]))
            c.confirmed = self.target.meets(*c.confirmation)
            if not c.confirmed:
                self.rejected.add(c.shape)
        best = self.best()
        self.log(f"confirmed {sum(c.confirmed for c in waiting)} of {len(waiting)} plans meeting the target"
                 + (f"; best {self.space.label(best.shape)}: {best.confirmation[0]:.2f}x, {best.confirmation[1]:.3f} ms"
                    if best is not None and best.confirmation else ""))
