"""``prune`` and ``plan_of``: the pipeline model → groups → plan → surgery."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import numbers
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from . import __version__
from .counting import Estimator, count
from .data import read_batches
from .groups import Groups, build_groups
from .importance import DATA_IMPORTANCE, IMPORTANCE, scores
from .modes import eval_mode
from .reconstruction import (Reconstruction, device_of, doomed_masks, join_single_images, phase1,
                             phase2, reestimate_bn)
from .selection import TARGETS, select
from .surgery import Kept, apply, compose, kept_indices, kept_statistics

#: methods that need calibration data (post-training reconstruction)
DATA_METHODS = ("bn", "layerwise", "global", "psp")
METHODS = ("magnitude",) + DATA_METHODS
#: the criteria ``importance="auto"`` plans with, keeping the plan that distorts the logits least (up to scale)
AUTO = ("l2", "taylor")
PLAN_ATTR = "_ptsp_plan"


def default_inputs(model: nn.Module) -> torch.Tensor:
    """A one-image example input from the model's timm data config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not cfg or "input_size" not in cfg:
        raise ValueError("example_inputs is required for a model without a timm data config "
                         "(pass example_inputs=torch.randn(1, C, H, W))")
    return torch.randn(1, *cfg["input_size"], generator=torch.Generator().manual_seed(0))


def prune(model: nn.Module, calib_loader: Iterable | None = None, ratio: float = 0.5, *,
          method: str = "psp", target: str = "channels", importance: str | None = None,
          reconstruction: Reconstruction | None = None, example_inputs: Any = None,
          max_ratio: float = 0.9, round_to: int = 1,
          ignored_layers: Iterable[nn.Module | str] = ()) -> nn.Module:
    """Return a physically smaller copy of ``model`` that keeps its function without retraining;
    ``model`` itself is not modified.

    Args:
        calib_loader: unlabeled calibration batches: image tensors, ``(images, labels)`` pairs
            (labels ignored) or dicts; see :func:`ptsp.data.calibration_loader`. Needed by every
            method except "magnitude".
        ratio: fraction to remove, in (0, 1): of prunable channels (``target="channels"``), or of
            the model's FLOPs / parameters (``target="flops"`` / ``"params"``).
        method: "psp" (two-phase reconstruction), "global" (phase 2 only, gAP), "layerwise"
            (AdaPrune), "bn" (BatchNorm re-estimation only) or "magnitude" (data-free).
        importance: channel criterion, one of :data:`ptsp.importance.IMPORTANCE`, or "auto" (the
            default of the calibrated methods): plan with each of :data:`AUTO` and keep the plan
            whose pruned model, BatchNorm re-estimated, matches the original's logits best up to
            scale on the calibration images (:func:`scale_free_error`). "magnitude" defaults to
            "l2" (PSP's).
        reconstruction: settings of the calibrated methods (:class:`Reconstruction`).
        example_inputs: input used to trace the model; defaults to the first calibration image,
            or one random image of the timm data config's size.
        max_ratio: most a single group may lose (every group keeps at least one channel). Below
            1, as a global ranking can otherwise strip a group whose channels all score low:
            taylor's ranking left mobilenetv3's conv_head 1 of its 1280 channels at 70% fewer
            FLOPs: every method at chance, psp 69.84% with 0.9 (dense 71.81).
        round_to: kept widths are multiples of this (hardware-friendly widths).
        ignored_layers: modules (or their names) whose channels are never pruned.

    The work runs on the model's device. The plan (kept indices, parameters and FLOPs
    before/after, and a report of each stage) is available as ``plan_of(pruned)``.
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
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if importance is None:
        importance = "auto" if method in DATA_METHODS else "l2"
    if importance not in IMPORTANCE and importance != "auto":
        raise ValueError(f"unknown importance {importance!r}; choose from "
                         f"{sorted(IMPORTANCE) + ['auto']}")
    if importance in DATA_IMPORTANCE + ("auto",) and method not in DATA_METHODS:
        raise ValueError(f"importance {importance!r} reads gradients on calibration data; "
                         f"method={method!r} has none (use a data-free criterion such as 'l2')")
    if not 0 < max_ratio <= 1:
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    if reconstruction is not None and not isinstance(reconstruction, Reconstruction):
        raise TypeError("reconstruction must be a ptsp.Reconstruction")
    settings = reconstruction or Reconstruction()
    device = device_of(model)
    batches = read_batches(calib_loader) if method in DATA_METHODS else None
    if example_inputs is not None:
        inputs = example_inputs
    elif batches is not None:
        inputs = batches[0][:1].to(device)
    else:
        inputs = default_inputs(model).to(device)
    if batches is not None:
        _check_fits(model, batches[0][:1].to(device))
        if settings.augment in ("flip", "shift", "cutmix") and method != "bn" and batches[0].dim() != 4:
            raise ValueError(f"Reconstruction(augment={settings.augment!r}) needs image batches (N, C, H, W), "
                             f"got shape {tuple(batches[0].shape)}")
        if method != "bn" and settings.bn.startswith("train"):
            batches = join_single_images(model, batches)
        if device.type == "cuda":  # page-locked: each pass's copies then leave the GPU's queue running
            batches = [b.pin_memory() for b in batches]

    times: dict[str, float] = {}
    clock = _Clock(times)
    with clock("groups"):
        groups = build_groups(model, inputs)
    skip = _ignored_groups(model, groups, ignored_layers)
    estimator = Estimator(model, groups, inputs)

    def plan_for(source: nn.Module, criterion: str) -> Callable[[set[int]], np.ndarray]:
        with clock("importance"):
            ranked = scores(groups, source, criterion, batches, settings.micro_batch)
        made: dict[frozenset[int], np.ndarray] = {}  # "auto" asks again for the plan it chose

        def plan(skip: set[int]) -> np.ndarray:
            key = frozenset(skip)
            if key not in made:
                made[key] = select(groups, ranked, ratio, target, estimator=estimator,
                                   max_ratio=max_ratio, round_to=round_to, skip=skip)
            return made[key]
        return plan

    report: dict[str, Any] = {}
    criterion = "l2" if importance == "auto" and not _gives_logits(model, batches) else importance
    if criterion == "auto":
        plans = {c: plan_for(model, c) for c in AUTO}
        with clock("importance"):
            report["importance"] = _distortions(model, groups, batches,
                                                {c: plan(skip) for c, plan in plans.items()})
        criterion = min(AUTO, key=report["importance"].get)
        make_plan = plans[criterion]
    else:
        make_plan = plan_for(model, criterion)
    with clock("plan_and_surgery"):
        removed, kept, pruned, skip = remove_checked(model, groups, inputs, skip, make_plan)
    if batches is not None:
        teacher = copy.deepcopy(model).requires_grad_(False) if method != "bn" else None
        if method == "psp":
            student = copy.deepcopy(model)
            norms = (kept_statistics(student, groups, removed) if settings.phase1_norms == "kept"
                     else contextlib.nullcontext())
            with clock("phase1"), norms:
                masks = doomed_masks(student, groups, removed)
                report["phase1"] = phase1(student, teacher, batches, kept, masks, settings,
                                          probe=pruned)
            make_plan = plan_for(student, criterion)
            with clock("plan_and_surgery"):
                removed, kept, pruned, skip = remove_checked(student, groups, inputs, skip, make_plan)
        if settings.bn == "reestimate" or method == "bn":
            with clock("bn"):
                reestimate_bn(pruned, batches)
        if method in ("psp", "global", "layerwise"):
            with clock("phase2"):
                report["phase2"] = phase2(pruned, teacher, batches, kept, settings,
                                          layerwise=method == "layerwise")
            if settings.bn in ("reestimate", "train+reestimate"):
                with clock("bn"):
                    reestimate_bn(pruned, batches)
        report["samples"] = int(sum(len(b) for b in batches))
    pruned.eval()
    plan = {
        "method": method,
        "importance": criterion,
        "target": target,
        "ratio": float(ratio),
        "max_ratio": float(max_ratio),
        "round_to": round_to,
        "reconstruction": dataclasses.asdict(settings) if batches is not None else None,
        **record(model, pruned, groups, removed, kept, inputs,
                 (estimator.params_before, estimator.flops_before)),
        "report": report,
        "seconds": times,
    }
    setattr(pruned, PLAN_ATTR, plan)
    return pruned


def _gives_logits(model: nn.Module, batches: list[torch.Tensor]) -> bool:
    """Whether the model's output is a (batch, classes) tensor, as Taylor importance needs."""
    with torch.no_grad():
        shape = _output_shape(model, (batches[0][:2].to(device_of(model)),))
    return shape is not None and len(shape) == 2


def _distortions(model: nn.Module, groups: Groups, batches: list[torch.Tensor],
                 removals: dict[str, np.ndarray]) -> dict[str, float]:
    """For each candidate removal: the scale-free error (:func:`scale_free_error`) of the logits of
    ``model`` with those channels zeroed (the function of the pruned model) and its BatchNorms
    re-estimated, against ``model``'s own, over the calibration batches."""
    device = device_of(model)
    with torch.no_grad(), eval_mode(model):
        reference = torch.cat([model(x.to(device)).float() for x in batches])
    out = {}
    for name, removed in removals.items():
        masked = copy.deepcopy(model)
        with torch.no_grad():
            for p, doomed in doomed_masks(masked, groups, removed):
                p[doomed] = 0
            reestimate_bn(masked, batches)
            out[name] = scale_free_error(torch.cat([masked(x.to(device)).float() for x in batches]), reference)
    return out


def scale_free_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """The relative squared error of ``out`` against ``reference`` after the best non-negative
    rescaling of ``out``, 1 − cos²: a plan whose logits are only scaled up or down keeps the
    dense model's predictions, and the reconstruction restores a scale at once."""
    dot = (out * reference).sum().clamp(min=0)
    return float(1 - dot * dot / (out.pow(2).sum() * reference.pow(2).sum()).clamp(min=1e-30))


def record(model: nn.Module, pruned: nn.Module, groups: Groups, removed: np.ndarray, kept: Kept,
           inputs: Any, before: tuple[int, int]) -> dict:
    """The plan fields every pruned model carries: kept original indices (composed with the plan
    ``model`` was pruned with, if any), channels, and parameters and FLOPs before and after."""
    params_after, flops_after = count(pruned, inputs)
    return {
        "ptsp_version": __version__,
        "input_shape": list(inputs.shape) if isinstance(inputs, torch.Tensor) else None,
        "kept": compose(getattr(model, PLAN_ATTR, {}).get("kept", {}),
                        {m: {t: {str(d): idx for d, idx in dims.items()} for t, dims in ts.items()}
                         for m, ts in kept.items()}),
        "channels": {"prunable": int(sum(g.channels for g in groups if g.prunable)),
                     "removed": int(removed.sum())},
        "params": {"before": before[0], "after": params_after},
        "flops": {"before": before[1], "after": flops_after},
    }


class _Clock:
    """Adds the wall time of each ``with clock(stage):`` block to ``times[stage]``."""

    def __init__(self, times: dict[str, float]) -> None:
        self.times = times

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0


def _check_fits(model: nn.Module, x: torch.Tensor) -> None:
    """One clear error, before any work, when the calibration images do not fit the model."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"calibration images of shape {tuple(x.shape[1:])} do not fit the model: "
                         f"{type(exc).__name__}: {reason}") from exc
    finally:
        model.train(was_training)


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
                   plan: Callable[[set[int]], np.ndarray]) -> tuple[np.ndarray, Kept, nn.Module, set[int]]:
    """Apply ``plan(skip)`` to a copy of ``model`` and run it on ``inputs``; returns the removal
    mask, the kept map, the pruned copy and the groups left out.

    Some module code bakes widths into what the graph cannot see (``reshape(B, N, C)`` with ``C``
    read from the input).
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
            return removed, kept, pruned, skip
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
