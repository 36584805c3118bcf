"""The plan: which channels go, from one global ranking that meets a channels, FLOPs or params target.

Channels are ranked globally by normalised importance. Removing the first ``k`` channels of the
ranking (subject to each group's floor and rounding) gives a removal that only grows with ``k``, so
the smallest ``k`` meeting the target is found by bisection: the target is met to within one
channel (one ``round_to`` step) of the group that crosses it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .groups import Groups

TARGETS = ("channels", "flops", "params")


class Selection:
    """Removal masks for prefixes of the global ranking."""

    def __init__(self, groups: Groups, scores: np.ndarray, *, max_ratio: float = 1.0,
                 round_to: int = 1, skip: set[int] = frozenset()) -> None:
        self.groups = groups
        self.round_to = round_to
        cand = [g for g in groups if g.prunable and g.index not in skip]
        self.order = np.array(sorted((i for g in cand for i in g.ids.tolist()),
                                     key=lambda i: (scores[i], i)), dtype=np.int64)
        self.group_of = np.full(groups.num_channels, -1, dtype=np.int64)
        for g in cand:
            self.group_of[g.ids] = g.index
        self.cap = {}
        rank = np.empty(groups.num_channels, dtype=np.int64)
        rank[self.order] = np.arange(len(self.order))
        self.keep_one: dict[int, list[np.ndarray]] = {}
        for g in cand:
            floor = max(1, math.ceil(g.channels * (1.0 - max_ratio) - 1e-9))
            self.cap[g.index] = max(0, g.channels - floor)
            # a member indexed by only some of the group's channels (one producer of a concat)
            # must keep one of them too; its best-ranked channel is the one spared
            parts = {tuple(np.unique(m.channel[m.channel >= 0]).tolist()) for m in g.members}
            self.keep_one[g.index] = [np.array(sorted(p, key=rank.__getitem__)) for p in parts
                                      if 0 < len(p) < g.channels]
        self.total = len(self.order)

    def _allowed(self, n: int, r: int) -> int:
        """Largest removal ≤ r leaving a width that is a multiple of ``round_to``."""
        if self.round_to <= 1 or r == 0:
            return r
        keep = n - r
        keep = -(-keep // self.round_to) * self.round_to  # round the kept width up
        return max(0, n - keep) if keep < n else 0

    def removed(self, k: int) -> np.ndarray:
        mask = np.zeros(self.groups.num_channels, dtype=bool)
        prefix = self.order[:k]
        by_group: dict[int, list[int]] = {}
        for i in prefix.tolist():
            by_group.setdefault(int(self.group_of[i]), []).append(i)
        for g, ids in by_group.items():
            r = self._allowed(self.groups[g].channels, min(len(ids), self.cap[g]))
            mask[ids[:r]] = True
            for part in self.keep_one[g]:
                if mask[part].all():
                    mask[part[-1]] = False
        return mask

    def smallest(self, reached: Callable[[np.ndarray], bool]) -> np.ndarray:
        """The removal for the smallest prefix whose removal satisfies ``reached``."""
        if not reached(self.removed(self.total)):
            raise ValueError("the target cannot be reached: too few prunable channels "
                             "(raise max_ratio, or lower the ratio)")
        lo, hi = 0, self.total
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(self.removed(mid)):
                hi = mid
            else:
                lo = mid + 1
        return self.removed(lo)


def select(groups: Groups, scores: np.ndarray, ratio: float, target: str = "channels", *,
           estimator=None, max_ratio: float = 1.0, round_to: int = 1,
           skip: set[int] = frozenset()) -> np.ndarray:
    """Mask over channel ids of the channels to remove.

    ``target="channels"``: remove ``ratio`` of the prunable channels; ``"flops"``/``"params"``:
    reduce the model's FLOPs/parameters by ``ratio`` (needs a :class:`~ptsp.counting.Estimator`).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    sel = Selection(groups, scores, max_ratio=max_ratio, round_to=round_to, skip=skip)
    if sel.total == 0:
        raise ValueError("the model has no prunable channels (see ptsp.build_groups for why)")
    if target == "channels":
        return sel.smallest(lambda m: m.sum() >= ratio * sel.total - 1e-9)
    if estimator is None:
        raise ValueError(f"target={target!r} needs an estimator")
    if target == "flops":
        goal = (1 - ratio) * estimator.flops_before
        return sel.smallest(lambda m: estimator.flops(m) <= goal)
    goal = (1 - ratio) * estimator.params_before
    return sel.smallest(lambda m: estimator.params(m) <= goal)
