"""The choice: one option per unit, at the least predicted accuracy cost, within a time budget.

A multiple-choice knapsack, solved exactly by dynamic programming over time discretised into ``bins``
steps, each option's time rounded *up* to a step: any choice the DP finds is within budget in real
time, and no choice within ``budget - units * step`` is cheaper than it (the rounding can cost at most
one step per unit), which is the quality guarantee reported with the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PartializeError


class SearchError(PartializeError):
    """The search cannot reach what was asked (with the best it can reach), or bad settings."""


@dataclass
class Choice:
    """The chosen option index per unit, its predicted time and cost, and the DP's guarantee."""

    picks: list[int]
    time: float
    cost: float
    step: float  # time discretisation: optimal among choices within budget - len(picks) * step

    @property
    def slack(self) -> float:
        return len(self.picks) * self.step


def choose(times: list[list[float]], costs: list[list[float]], budget: float, bins: int = 4000) -> Choice:
    """Pick one option per unit (``times[u][k]``, ``costs[u][k]``) with total time <= ``budget`` and the
    least total cost; SearchError when even the fastest options exceed the budget."""
    if len(times) != len(costs) or any(len(t) != len(c) or not t for t, c in zip(times, costs)):
        raise SearchError("every unit needs at least one option, with a time and a cost each")
    fastest = sum(min(t) for t in times)
    if fastest > budget:
        raise SearchError(f"fastest choice takes {fastest:.6g} > budget {budget:.6g}")
    step = budget / bins
    inf = math.inf
    best = [inf] * (bins + 1)  # best[b]: least cost using exactly b steps so far
    best[0] = 0.0
    back: list[list[tuple[int, int]]] = []
    for t_u, c_u in zip(times, costs):
        nxt = [inf] * (bins + 1)
        arg = [(-1, -1)] * (bins + 1)
        w = [math.ceil(t / step - 1e-9) for t in t_u]
        for b, cost in enumerate(best):
            if cost == inf:
                continue
            for k, (wk, ck) in enumerate(zip(w, c_u)):
                nb = b + wk
                if nb <= bins and cost + ck < nxt[nb]:
                    nxt[nb], arg[nb] = cost + ck, (b, k)
        best = nxt
        back.append(arg)
    end = min(range(bins + 1), key=lambda b: best[b])
    if best[end] == inf:  # rounding up made the fastest choice overflow: more bins would fix it
        raise SearchError("the time budget is too tight for the discretisation; raise bins")
    picks, b = [], end
    for arg in reversed(back):
        prev, k = arg[b]
        picks.append(k)
        b = prev
    picks.reverse()
    total = sum(times[u][k] for u, k in enumerate(picks))
    return Choice(picks, total, best[end], step)
