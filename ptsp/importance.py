"""Channel importance: pure functions of a group and the model's tensors.

Each criterion returns one score per channel of the group (higher = more important). Scores are
normalised by the group's mean before the global ranking, so groups of different sizes and
scales compete fairly (PSP's choice).
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from .groups import Group

Importance = Callable[[Group, Mapping[str, torch.Tensor]], np.ndarray]


def _scored_members(group: Group, tensors: Mapping[str, torch.Tensor]):
    """Weights, consumer columns and norm scales; biases and running statistics carry no
    magnitude information about a channel's contribution."""
    for m in group.members:
        if m.tensor in tensors and not m.tensor.endswith("bias"):
            yield m, tensors[m.tensor]


def _norm(group: Group, tensors: Mapping[str, torch.Tensor], p: float) -> np.ndarray:
    lookup = {int(c): i for i, c in enumerate(group.ids)}
    scores = np.zeros(group.channels)
    count = 0
    for m, t in _scored_members(group, tensors):
        other = [d for d in range(t.dim()) if d not in m.dims]
        per = t.detach().abs().pow(p).sum(other) if other else t.detach().abs().pow(p)
        if list(m.dims) != sorted(m.dims):
            per = per.permute(*np.argsort(np.argsort(m.dims)))
        per = per.double().cpu().numpy().reshape(m.channel.shape)
        idx = np.array([lookup.get(int(c), -1) for c in m.channel.ravel()])
        ok = idx >= 0
        np.add.at(scores, idx[ok], per.ravel()[ok])
        count += 1
    return scores / max(count, 1)


def l2(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """PSP's score: mean over the group's members of each channel's squared L2 norm."""
    return _norm(group, tensors, 2.0)


def l1(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Mean over members of each channel's L1 norm."""
    return _norm(group, tensors, 1.0)


def bn_scale(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """|γ| of the batch norms in the group (Network Slimming); falls back to l2 without one."""
    lookup = {int(c): i for i, c in enumerate(group.ids)}
    scores, found = np.zeros(group.channels), False
    for m in group.members:
        if m.tensor.endswith(".weight") and m.role == "elem" and m.tensor in tensors and len(m.dims) == 1:
            t = tensors[m.tensor].detach().abs().double().cpu().numpy()
            for c, v in zip(m.channel.tolist(), t.tolist()):
                if c in lookup:
                    scores[lookup[c]] += v
            found = True
    return scores if found else l2(group, tensors)


def random(group: Group, tensors: Mapping[str, torch.Tensor], seed: int = 0) -> np.ndarray:
    """A control: seeded random scores."""
    rng = np.random.default_rng(seed + group.index)
    return rng.random(group.channels)


IMPORTANCE: dict[str, Importance] = {"l2": l2, "l1": l1, "bn_scale": bn_scale, "random": random}


def normalised_scores(groups, tensors: Mapping[str, torch.Tensor], criterion: str = "l2") -> np.ndarray:
    """Scores of every prunable channel over global channel ids, each group divided by its mean
    (NaN for channels that cannot be pruned)."""
    if criterion not in IMPORTANCE:
        raise ValueError(f"unknown importance {criterion!r}; choose from {sorted(IMPORTANCE)}")
    fn = IMPORTANCE[criterion]
    out = np.full(groups.num_channels, np.nan)
    for g in groups:
        if g.prunable:
            s = fn(g, tensors)
            mean = s.mean()
            out[g.ids] = s / mean if mean > 0 else np.ones_like(s)
    return out
