"""``prune`` and ``plan_of``: the pipeline model → groups → plan → surgery."""
from __future__ import annotations

import copy
import numbers
import time
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import __version__
from .counting import Estimator, count
from .groups import Groups, build_groups
from .importance import IMPORTANCE, normalised_scores
from .selection import TARGETS, select
from .surgery import Kept, apply, kept_indices

#: methods that need calibration data (post-training reconstruction)
DATA_METHODS = ("bn", "layerwise", "global", "psp")
METHODS = ("magnitude",) + DATA_METHODS
PLAN_ATTR = "_ptsp_plan"


def default_inputs(model: nn.Module) -> torch.Tensor:
    """A one-image example input from the model's timm data config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not cfg or "input_size" not in cfg:
        raise ValueError("example_inputs is required for a model without a timm data config "
                         "(pass example_inputs=torch.randn(1, C, H, W))")
    return torch.randn(1, *cfg["input_size"], generator=torch.Generator().manual_seed(0))


def prune(model: nn.Module, calib_loader: Iterable | None = None, ratio: float = 0.5, *,
          method: str = "magnitude", target: str = "channels", importance: str = "l2",
          example_inputs: Any = None, max_ratio: float = 1.0, round_to: int = 1,
          ignored_layers: Iterable[nn.Module | str] = ()) -> nn.Module:
    """Return a physically smaller copy of ``model``; ``model`` itself is not modified.

    Args:
        calib_loader: unlabeled calibration batches (needed by every method except "magnitude").
        ratio: fraction to remove, in (0, 1): of prunable channels (``target="channels"``), or of
            the model's FLOPs / parameters (``target="flops"`` / ``"params"``).
        method: "magnitude" (data-free).
        importance: channel criterion, one of :data:`ptsp.importance.IMPORTANCE`.
        example_inputs: input used to trace the model; defaults to one random image of the
            timm data config's size.
        max_ratio: most a single group may lose (every group keeps at least one channel).
        round_to: kept widths are multiples of this (hardware-friendly widths).
        ignored_layers: modules (or their names) whose channels are never pruned.

    The plan (kept indices, parameters and FLOPs before/after) is available as ``plan_of(pruned)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be a number strictly between 0 and 1, got {ratio!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method in DATA_METHODS and calib_loader is None:
        raise ValueError(f"method={method!r} needs calibration data: pass calib_loader "
                         "(or use method='magnitude' for data-free pruning)")
    if method in DATA_METHODS:
        raise NotImplementedError(f"method={method!r} is not available in ptsp {__version__}; "
                                  "use method='magnitude'")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; choose from {sorted(IMPORTANCE)}")
    if not 0 < max_ratio <= 1:
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    inputs = default_inputs(model) if example_inputs is None else example_inputs

    times = {}
    t0 = time.perf_counter()
    groups = build_groups(model, inputs)
    times["groups"] = time.perf_counter() - t0
    skip = _ignored_groups(model, groups, ignored_layers)
    tensors = dict(model.named_parameters())
    scores = normalised_scores(groups, tensors, importance)
    estimator = Estimator(model, groups)
    t0 = time.perf_counter()
    removed, kept, pruned = remove_checked(
        model, groups, inputs, skip,
        lambda skip: select(groups, scores, ratio, target, estimator=estimator,
                            max_ratio=max_ratio, round_to=round_to, skip=skip))
    times["plan_and_surgery"] = time.perf_counter() - t0
    params_after, flops_after = count(pruned, inputs)
    plan = {
        "ptsp_version": __version__,
        "method": method,
        "importance": importance,
        "target": target,
        "ratio": float(ratio),
        "max_ratio": float(max_ratio),
        "round_to": round_to,
        "input_shape": list(inputs.shape) if isinstance(inputs, torch.Tensor) else None,
        "kept": {m: {t: {str(d): idx for d, idx in dims.items()} for t, dims in ts.items()}
                 for m, ts in kept.items()},
        "channels": {"prunable": int(sum(g.channels for g in groups if g.prunable)),
                     "removed": int(removed.sum())},
        "params": {"before": estimator.params_before, "after": params_after},
        "flops": {"before": estimator.flops_before, "after": flops_after},
        "seconds": times,
    }
    setattr(pruned, PLAN_ATTR, plan)
    return pruned


def plan_of(pruned: nn.Module) -> dict:
    """The plan a pruned model was made with (JSON-serialisable)."""
    plan = getattr(pruned, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("this model was not produced by ptsp.prune (it carries no plan)")
    return plan


def _ignored_groups(model: nn.Module, groups: Groups, ignored: Iterable[nn.Module | str]) -> set[int]:
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = []
    for item in ignored:
        name = item if isinstance(item, str) else names.get(id(item))
        if name is None or (isinstance(item, str) and item not in dict(model.named_modules())):
            raise ValueError(f"ignored_layers: {item!r} is not a module of this model")
        prefixes.append(name + "." if name else "")
    return {g.index for g in groups
            if any(m.tensor.startswith(p) for m in g.members for p in prefixes)}


#: how many times a plan is revised after the pruned model failed to run
MAX_REPAIRS = 20


def remove_checked(model: nn.Module, groups: Groups, inputs: Any, skip: set[int],
                   plan: Callable[[set[int]], np.ndarray]) -> tuple[np.ndarray, Kept, nn.Module]:
    """Apply ``plan(skip)`` to a copy of ``model`` and run it on ``inputs``; returns the removal
    mask, the kept map and the pruned copy.

    Some module code bakes widths into attributes the graph cannot see (``x.view(self.shape)``).
    When the pruned copy fails, the groups whose channels pass through the failing module are
    left unpruned and the plan is made again; one warning lists what was left out and why.
    """
    skip, notes = set(skip), []
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        expected = _output_shape(model, args)
    for _ in range(MAX_REPAIRS):
        removed = plan(skip)
        kept = kept_indices(groups, removed)
        pruned = apply(copy.deepcopy(model), kept)
        failure = _failing_module(pruned, args, expected)
        if failure is None:
            if notes:
                warnings.warn("ptsp: left unpruned because module code assumes fixed widths: "
                              + "; ".join(notes), stacklevel=3)
            return removed, kept, pruned
        path, error = failure
        culprits: set[int] = set()
        while True:  # the failing module's code is shared by every module of its class
            cls = type(model.get_submodule(path))
            paths = [n for n, m in model.named_modules() if type(m) is cls] if path else [""]
            culprits = {g for p in paths for g in groups.touching(p) if removed[groups[g].ids].any()}
            if culprits or not path:
                break
            path = path.rpartition(".")[0]
        if not culprits:
            raise RuntimeError(f"the pruned model fails and no group can be blamed: {error}")
        skip |= culprits
        notes.append(f"{len(culprits)} group(s) through {cls.__name__} modules ({error})")
        if all(not g.prunable or g.index in skip for g in groups):
            raise RuntimeError("every prunable group passes through module code that assumes "
                               "fixed widths: " + "; ".join(notes))
    raise RuntimeError(f"the pruned model still fails after {MAX_REPAIRS} revisions: {notes[-1]}")


def _output_shape(model: nn.Module, args: tuple) -> Any:
    was_training = model.training
    model.eval()
    try:
        out = model(*args)
    finally:
        model.train(was_training)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None


def _failing_module(model: nn.Module, args: tuple, expected: Any) -> tuple[str, str] | None:
    """(innermost module running when the forward failed, error) or None if it runs and its
    output has the expected shape."""
    stack: list[str] = []

    def enter(name: str) -> Callable:
        def hook(*_: Any) -> None:
            stack.append(name)
        return hook

    def leave(*_: Any) -> None:
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (stack[-1] if stack else ""), f"{type(exc).__name__}: {msg}"[:200]
    finally:
        for h in handles:
            h.remove()
    if expected is not None and tuple(out.shape) != expected:
        return "", f"output shape {tuple(out.shape)} instead of {expected}"
    return None
