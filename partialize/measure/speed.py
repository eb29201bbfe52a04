"""Side-by-side timing: candidates run interleaved, round after round, so drift in machine load
hits all of them alike; results are medians with spread, compared as ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    """Per-call time of one candidate in seconds over ``rounds`` interleaved rounds."""

    name: str
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    rounds: int
    calls_per_round: int

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 7,
    warmup: int = 2,
    min_round_s: float = 0.05,
    max_calls: int = 200,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time each zero-argument callable, interleaving them round by round.

    Each candidate gets ``warmup`` untimed calls, then a call count per round chosen so a round
    lasts at least ``min_round_s`` (capped at ``max_calls``); the order rotates every round.
    """
    names = list(fns)
    calls: dict[str, int] = {}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                fns[name]()
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            one = max(time.perf_counter() - t0, 1e-7)
            calls[name] = max(1, min(max_calls, int(min_round_s / one)))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn, k = fns[name], calls[name]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                _sync(device)
                samples[name].append((time.perf_counter() - t0) / k)
    out = {}
    for name in names:
        s = sorted(samples[name])
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        out[name] = Timing(name, statistics.median(s), s[0], s[-1], q[2] - q[0], rounds, calls[name])
    return out
