#!/usr/bin/env python
"""Statistical power of ``pnc.analysis.detect_transition`` on planted CDNV curves (a script, not a test).

    python bench/bench_detector.py                 # every shape, 3 noise levels, 3 network sizes, 100 curves each
    python bench/bench_detector.py --curves 40     # quicker

Each curve is the log CDNV of a 3-stage CIFAR ResNet's taps (n blocks per stage, then the pooled head that repeats
the last block), planted stage by stage, plus Gaussian noise of standard deviation ``sd`` (log units) on every tap;
the detector sees exp of it. The shapes are those the embedded depth sweep shows (README, issue 18) and two controls:

- ``three_phase``: the paper's shape with continuous lines: decline over the first 30% of the taps, flat to 70%,
  decline after (total decline 4). A reader calls the middle a plateau: it should be found.
- ``steps_rising_first``: stage 1 rises by 0.5, the step into stage 2 falls by 1.5, stage 2 is flat, the step into
  stage 3 falls by 1, stage 3 declines by 1.5. A reader calls stage 2 a plateau between two declines.
- ``flat_then_decline``: stages 1 and 2 flat (no initial decline), stage 3 and its boundary decline by 4: a plateau,
  then one decline; not the paper's three-phase shape (no initial decline), so a "transition" here is a false one.
- ``straight``: a straight decline by 4 (no plateau): false positives.

Prints, per shape, sd and network size, the share of curves on which a transition is reported and the most common
reason when it is not. The detector is deterministic (seeded); the curves are seeded by ``--seed``.
"""
from __future__ import annotations

import argparse
import collections

import numpy as np

from pnc.analysis import detect_transition


def planted(shape: str, n: int) -> np.ndarray:
    """Noise-free log CDNV of the 3n block taps and the pooled head (3n + 1 values)."""
    t = np.arange(n, dtype=np.float64) / max(n - 1, 1)  # position inside a stage, 0..1
    if shape == "three_phase":
        x = np.linspace(0, 1, 3 * n)
        y = np.where(x < 0.3, -2 * x / 0.3, np.where(x < 0.7, -2.0, -2.0 - 2 * (x - 0.7) / 0.3))
    elif shape == "steps_rising_first":
        y = np.concatenate([0.5 * t, np.full(n, 0.5 - 1.5), -1.0 - 1.0 - 1.5 * t])
    elif shape == "flat_then_decline":
        y = np.concatenate([np.zeros(n), np.zeros(n), -1.0 - 3.0 * t])
    elif shape == "straight":
        y = np.linspace(0, -4, 3 * n)
    else:
        raise ValueError(shape)
    return np.append(y, y[-1])


SHAPES = {"three_phase": True, "steps_rising_first": True, "flat_then_decline": False, "straight": False}


def rates(shape: str, n: int, sd: float, curves: int, seed: int) -> tuple[float, str]:
    rng = np.random.default_rng(seed)
    base = planted(shape, n)
    found, reasons = 0, collections.Counter()
    for _ in range(curves):
        y = base + sd * rng.standard_normal(len(base))
        y[-1] = y[-2]  # the head repeats the last block exactly, as with avgpool taps
        t = detect_transition(np.exp(y))
        found += t.found
        if not t.found:
            reasons[t.reason.split(" (")[0]] += 1
    return found / curves, (reasons.most_common(1)[0][0] if reasons else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--curves", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sd", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--blocks", type=int, nargs="+", default=[5, 9, 18], help="blocks per stage (ResNet-32/56/110)")
    a = ap.parse_args()
    print(f"{'shape':<20} {'should find':>11} {'blocks/stage':>12} {'sd':>5} {'found':>6}  most common reason when not")
    for shape, should in SHAPES.items():
        for n in a.blocks:
            for sd in a.sd:
                r, why = rates(shape, n, sd, a.curves, a.seed)
                print(f"{shape:<20} {str(should):>11} {n:>12} {sd:>5.2f} {r:>6.2f}  {why}")


if __name__ == "__main__":
    main()
