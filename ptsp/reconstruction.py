"""Reconstruction: bring a pruned student's function back to the original (teacher) on unlabeled data.

One engine serves every calibrated method. Each step runs the frozen teacher on a calibration batch,
recording the output of every conv, linear and norm layer, then runs the student on the same batch;
the student's hooks score each layer against the teacher as it goes (so a teacher activation lives
only until its student counterpart has used it) and the summed relative errors are minimised:

* phase 1 (PSP): the unpruned student, with a growing penalty on the slices the plan will remove;
* phase 2 (PSP, gAP): the physically pruned student against the teacher's kept channels, with the
  *balanced* update (earlier layers get smaller steps, since their outputs feed every later term);
* layer-wise (AdaPrune): phase 2 with every student layer fed the teacher's input instead.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .groups import Groups
from .modes import eval_mode, gradient_modes
from .surgery import Kept, broadcast_mask

#: the layers whose outputs the holistic loss matches
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm,
               nn.LayerNorm, nn.RMSNorm)
#: a layer whose activation cannot be mapped to the pruned one is left out of the loss
UNMAPPED = "unmapped"
#: the smallest scale a tensor's relative rate takes (``Reconstruction.relative_lr``), so that a
#: tensor of zeros still moves
RELATIVE_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """Settings of the calibrated methods (method.md §3–4). The defaults are chosen by measurement
    (recipes/results/ablation.md): the authors' loss choices (replace-gradient penalty, every
    channel as a phase-1 target), which beat the paper's; BatchNorm in train mode during the
    reconstruction, as the authors' code (both models normalise each batch by its own statistics,
    so the student's norms follow its changing weights), then the statistics of the returned
    weights re-estimated exactly; execution order; each tensor's learning rate relative to its own
    scale (``relative_lr``, 3e-2 of its RMS), which kept more accuracy than one absolute rate on
    most reference models measured.
    ``Reconstruction.authors()`` gives every reconstruction choice of the PSP authors' code (their
    plan is ``importance="l2"``).

    Attributes:
        phase1_passes / phase2_passes: passes over the calibration set in each phase.
        lr: Adam learning rate (the last layer's rate under the balanced update), a fraction of
            each tensor's RMS under ``relative_lr``.
        phase1_lr: phase 1's learning rate (None: ``lr``). Lower, it moves the kept weights less
            while the doomed ones shrink (more slowly): a trade-off, so not the default. At 50%
            fewer FLOPs, with absolute rates (lr=3e-3), 3e-4 kept 99.4% of deit_tiny's dense
            test predictions against 97.1%, at the same top-1, and resnet18 gained 0.09 points
            (0.12 with 1e-3); mobilenetv3 and resnet10t, where phase 1 carries more of the
            information, lost 0.70 and 0.73 (with 1e-3: 0.69 and 0.16; recipes/results/ablation.md).
        relative_lr: each parameter tensor's rate is ``lr`` (and ``phase1_lr``) times its RMS when
            the phase starts (at least 1e-3), so that every tensor moves by about the same fraction
            of its own scale per step; with one absolute rate, Adam moves a convolution's weights
            (RMS about 0.03) by a tenth of their scale per step and a norm's scales (about 1) by
            a three-hundredth. The default, with ``lr=3e-2``: against the absolute 3e-3 it moved
            top-1 at 50% fewer FLOPs by +0.55 (mobilenetv3), +0.23 (resnet18), +0.07 (resnet50),
            +0.03 (deit_tiny), −0.05 (densenet121) and −0.09 (convnext_atto); ``lr=1e-2``
            mobilenetv3, resnet18, densenet121 and convnext_atto by −0.62, +0.38, −0.01 and −0.09
            (recipes/results/README.md). ``relative_lr=False, lr=3e-3`` gives the earlier default.
        penalty: "replace" replaces the doomed slices' gradient by ``λ·lr·W`` (the code): under
            Adam a step of about lr toward zero, so small weights reach zero in a few steps while
            norm scales near 1 are only partly shrunk; "l2" adds the gradient of a growing L2
            penalty ``λ/2·||W_doomed||²`` (the paper's intent); "fade" is the proximal form: the
            doomed slices take no gradient step and are shrunk at each step, on a schedule that
            takes them linearly to exactly zero on phase 1's last step (λ is not used), so removal
            then changes nothing.
        lmbda / lmbda_step: λ in pass j is ``lmbda + j·lmbda_step`` ("replace" and "l2").
        phase1_targets: "all" matches every channel in phase 1 (the code), pulling the doomed
            channels' outputs against the penalty; "kept" only the channels that survive.
        phase1_norms: the statistics of layer, group and RMS norms over channels in phase 1:
            "kept" takes them over the kept channels only, as the pruned model will (so a doomed
            channel, shrinking or not, does not shift its neighbours' normalisation, and removal
            changes no surviving norm's output); "all" over every channel, as the masked model of
            the authors' code. BatchNorm normalises each channel apart, so CNNs without channel
            norms give the same result either way. Not the default, as it splits the two
            reference models whose plans narrow a normed stream, at every calibration draw:
            convnext_atto gains up to 0.34 points at 70% fewer FLOPs, deit_tiny loses 0.40–0.65
            (three draws each; recipes/results/ablation.md).
        balance: where the balanced update ``lr/(L−k+1)`` applies: "phase2", "both" or "none".
        order: layer order k for the balanced update: "execution" (forward order) or
            "registration" (module definition order, the code's choice).
        bn: "reestimate": teacher and student in eval mode, BatchNorm statistics re-estimated on
            the calibration data after removal and at the end; "train": both models' BatchNorms in
            train mode throughout (the code, which re-estimates them implicitly);
            "train+reestimate": train mode throughout, then the statistics of the final weights
            re-estimated exactly; "none".
        teacher_cache_gb: GiB of the teacher's recorded activations a phase may keep from its
            first pass for the others, so that the fixed teacher runs once per batch rather than
            once per pass (the same result: a quarter less compute in phase 1, more in phase 2);
            None: half the memory available when the phase starts (host RAM, or the CUDA
            device's free memory); 0: run the teacher in every pass.
        augment: "none", "flip", "shift", "mixup" or "cutmix": each step varies its calibration
            batch (seeded) before teacher and student see it, so a few hundred images give the
            layers more distinct inputs to match: "flip" mirrors a random half of the images left
            to right, "shift" also moves each by up to an eighth of its side (edges repeated),
            "mixup" blends each image with another of the batch at a uniform random weight,
            "cutmix" pastes a random square (a quarter of the side or more) of another image of
            the batch. The teacher then runs in every pass (no cache); BatchNorm statistics are
            still re-estimated on the images as given. Not the default: at 50% fewer FLOPs on
            eight reference models, cutmix moved top-1 by −0.13 to +0.50 points (mean +0.10; on
            the six main ones under the relative rate, −0.80 to +0.31, mean −0.07),
            mixup by −0.18 to +0.19 (mean −0.03), and on densenet121 flip and shift by −0.20 and
            −0.18; another draw of the images alone moves it up to 0.3 (recipes/results/ablation.md,
            noise.md). Remixed batches keep giving new inputs, so more passes pay with cutmix:
            with 60+30 passes it gained densenet121 0.70–0.89 over three draws (the same passes
            without it: −0.11), and moved the other five references by −0.08 to +0.52 (mean over
            the six +0.22), for about four times the time.
        micro_batch: split each batch into pieces of this size: less memory for one more
            teacher pass per batch. With BatchNorm in eval mode the gradient is the same; in train
            mode each piece is normalised by its own statistics, as a smaller batch would be.
        amp: bfloat16 autocast for the reconstruction passes where the hardware runs bfloat16
            natively: CUDA, and CPUs with AMX or AVX512-BF16 (about 4.5× faster there for
            resnet18); elsewhere it is ignored, as emulated bfloat16 is slower than float32.
        progress: show a progress bar per phase.
    """

    phase1_passes: int = 20
    phase2_passes: int = 10
    lr: float = 3e-2
    phase1_lr: float | None = None
    relative_lr: bool = True
    penalty: str = "replace"
    lmbda: float = 0.02
    lmbda_step: float = 0.02
    phase1_targets: str = "all"
    phase1_norms: str = "all"
    balance: str = "phase2"
    order: str = "execution"
    bn: str = "train+reestimate"
    augment: str = "none"
    teacher_cache_gb: float | None = None
    micro_batch: int | None = None
    amp: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {"penalty": ("l2", "replace", "fade"), "phase1_targets": ("kept", "all"),
                   "phase1_norms": ("kept", "all"),
                   "balance": ("phase2", "both", "none"), "order": ("execution", "registration"),
                   "augment": ("none", "flip", "shift", "mixup", "cutmix"),
                   "bn": ("reestimate", "train", "train+reestimate", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Reconstruction.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("phase1_passes", "phase2_passes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Reconstruction.{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "phase1_lr", "lmbda", "lmbda_step", "teacher_cache_gb"):
            value = getattr(self, name)
            if name in ("phase1_lr", "teacher_cache_gb") and value is None:
                continue
            rate = name.endswith("lr")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (rate and value == 0):
                raise ValueError(f"Reconstruction.{name} must be a finite number "
                                 f"{'> 0' if rate else '>= 0'}, got {value!r}")
        for name in ("relative_lr", "amp", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Reconstruction.{name} must be True or False, got {getattr(self, name)!r}")
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise ValueError(f"Reconstruction.micro_batch must be a positive integer or None, "
                             f"got {self.micro_batch!r}")
        if self.micro_batch == 1 and self.bn.startswith("train"):
            raise ValueError(f"Reconstruction.micro_batch=1 cannot go with bn={self.bn!r}: "
                             "BatchNorm in train mode needs two images per batch")

    @classmethod
    def authors(cls, **changes: Any) -> "Reconstruction":
        """The settings of the PSP authors' code (replace-gradient penalty, every channel as a
        phase-1 target, norms over every channel in phase 1, registration order, BatchNorm in train
        mode, one absolute learning rate of 1e-3)."""
        return dataclasses.replace(cls(phase1_norms="all", order="registration", bn="train", lr=1e-3,
                                       relative_lr=False),
                                   **changes)


Select = tuple[int, torch.Tensor] | None | str
#: per target layer, per call of it in a forward: its loss divisor and gradient factor (``_norm``)
_Norms = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclasses.dataclass
class _Target:
    """How one layer enters the loss: channel selections applied to the teacher's output, the
    student's output and (layer-wise only) the teacher's input fed to the student."""

    teacher_out: Select = None
    student_out: Select = None
    teacher_in: Select = None


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def doomed_masks(model: nn.Module, groups: Groups, removed: np.ndarray) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each parameter touched by a removed channel with the mask of its doomed entries (output
    rows, consumer input columns, norm scales and shifts)."""
    ext = np.append(removed, False)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for g in groups:
        if not removed[g.ids].any():
            continue
        for m in g.members:
            if m.tensor not in tensors or not ext[m.channel].any():
                continue
            p = tensors[m.tensor]
            gone = broadcast_mask(torch.as_tensor(ext[m.channel], device=p.device), m.dims, p.dim()).expand(p.shape)
            prev = masks.get(id(p), (p, torch.zeros(p.shape, dtype=torch.bool, device=p.device)))[1]
            masks[id(p)] = (p, prev | gone)
    return list(masks.values())


def reestimate_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Recompute every BatchNorm's running statistics as the average over the calibration batches
    (as ``torch.optim.swa_utils.update_bn``, but with dropout and the rest in eval mode); the
    model is left in eval mode."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    device = device_of(model)
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def phase1(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], kept: Kept,
           masks: list[tuple[nn.Parameter, torch.Tensor]], settings: Reconstruction,
           probe: nn.Module) -> dict:
    """Squeeze: match the teacher while a growing penalty drives the ``masks`` entries to zero.
    ``probe`` is the model pruned by the current plan (only its activation shapes are used)."""
    if settings.phase1_lr is not None:
        settings = dataclasses.replace(settings, lr=settings.phase1_lr)
    restrict = settings.phase1_targets == "kept"
    sel = _selections(teacher, probe, kept, batches[0][:1])
    targets = {n: _Target(teacher_out=s[1], student_out=s[1]) if restrict else _Target()
               for n, s in sel.items() if not restrict or s[1] != UNMAPPED}

    steps = settings.phase1_passes * len(batches)
    taken = 0
    # every masked parameter at once, in a few multi-tensor operations (one or two per parameter
    # were a kernel launch each on a GPU); ``doomed`` is 1 on the masked entries, 0 elsewhere
    params = [p for p, _ in masks]
    doomed = [mask.to(p.dtype) for p, mask in masks]

    def penalise(pass_index: int, lrs: dict[int, float]) -> None:
        nonlocal taken
        taken += 1
        lmbda = settings.lmbda + pass_index * settings.lmbda_step
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            if settings.penalty == "l2":  # grad + λ·W on the doomed entries
                torch._foreach_addcmul_(grads, params, doomed, lmbda)
                return
            torch._foreach_addcmul_(grads, grads, doomed, -1)  # the doomed entries' gradient zeroed
            if settings.penalty == "fade":  # W·(steps − taken)/(steps − taken + 1) there
                torch._foreach_addcmul_(params, params, doomed, -1 / (steps - taken + 1))
            else:  # "replace": λ·lr·W there
                torch._foreach_addcmul_(grads, params, doomed, [lmbda * lrs[id(p)] for p in params])

    return _optimise(student, teacher, batches, targets, settings, settings.phase1_passes,
                     balanced=settings.balance == "both", desc="phase 1", before_step=penalise)


def phase2(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], kept: Kept,
           settings: Reconstruction, layerwise: bool = False) -> dict:
    """Recalibrate the pruned ``student`` against the teacher's kept channels; ``layerwise`` feeds
    each student layer the teacher's input (AdaPrune) instead of the student's own activations."""
    sel = _selections(teacher, student, kept, batches[0][:1])
    targets = {n: _Target(teacher_out=s[1], teacher_in=s[0] if layerwise else None)
               for n, s in sel.items()
               if s[1] != UNMAPPED and not (layerwise and s[0] == UNMAPPED)}
    balanced = not layerwise and settings.balance in ("phase2", "both")
    return _optimise(student, teacher, batches, targets, settings, settings.phase2_passes,
                     balanced=balanced, desc="layer-wise" if layerwise else "phase 2",
                     feed=layerwise)


def _optimise(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor],
              targets: dict[str, _Target], settings: Reconstruction, passes: int, *,
              balanced: bool, desc: str, feed: bool = False,
              before_step: Callable[[int, dict[int, float]], None] | None = None) -> dict:
    """Adam on the summed relative layer errors; returns the mean loss of every pass. A loss that
    turns non-finite stops the phase at the end of that pass with the best weights seen restored."""
    report: dict[str, Any] = {"passes": passes, "layers": len(targets), "loss": []}
    if passes == 0 or not targets:
        return report
    device = device_of(student)
    augmenting = settings.augment != "none"
    generator = torch.Generator().manual_seed(0)
    train_bn = settings.bn.startswith("train")
    gradient_modes(student, train_bn)
    gradient_modes(teacher, train_bn)
    param_groups = _param_groups(student, batches[0][:1].to(device), settings.lr, balanced,
                                 settings.order, settings.relative_lr)
    optimiser = _Adam(param_groups)
    lrs = {id(p): g["lr"] for g in param_groups for p in g["params"]}
    best_loss, best_state = math.inf, _snapshot(student)
    total = sum(len(b) for b in batches)
    bar = tqdm(total=passes * len(batches), desc=f"ptsp {desc}", disable=not settings.progress,
               leave=False)
    # the teacher's layer energies of each batch, the same in every pass (the teacher is fixed)
    # unless the batches are augmented
    energies: dict[int, _Norms] = {}
    hooks = _Hooks(student, teacher, targets, feed, batches[0][:1].to(device),
                   _cache_bytes(settings.teacher_cache_gb, device) if passes > 1 and not augmenting else 0,
                   total)
    try:
        with hooks:
            for j in range(passes):
                # each batch's losses stay on the device until the pass ends: one host sync per
                # pass, so an accelerator's queue never drains between steps
                parts: list[list[torch.Tensor]] = []
                for i, x in enumerate(batches):
                    optimiser.zero_grad()
                    if augmenting:
                        x = _augment(x, settings.augment, generator)
                        energies.pop(i, None)  # the teacher's energies of the new batch
                    pieces = [p.to(device, non_blocking=True) for p in _pieces(x, settings.micro_batch)]
                    if i not in energies and len(pieces) > 1:
                        with autocast(device, settings.amp):
                            energies[i] = hooks.energies(pieces)
                    parts.append([])
                    for k, piece in enumerate(pieces):
                        with autocast(device, settings.amp):
                            part = hooks.loss(piece, energies.get(i), (i, k))
                        hooks.backward(part)
                        parts[-1].append(part.detach())
                    energies[i] = hooks.energy
                    if before_step is not None:
                        before_step(j, lrs)
                    optimiser.step()
                    bar.update()
                values = iter(torch.stack([v for b in parts for v in b]).tolist())
                losses = [sum(next(values) for _ in b) for b in parts]
                if not all(math.isfinite(v) for v in losses):
                    student.load_state_dict(best_state)
                    warnings.warn(f"ptsp: the {desc} loss became non-finite in pass {j + 1}; "
                                  "stopped it and restored the best weights seen", stacklevel=4)
                    report["stopped"] = f"non-finite loss in pass {j + 1}"
                    return report
                running = sum(v * len(x) for v, x in zip(losses, batches))
                mean = running / total
                report["loss"].append(mean)
                bar.set_postfix(loss=f"{mean:.4g}")
                if mean < best_loss:
                    best_loss, best_state = mean, _snapshot(student)
    finally:
        report["teacher_cached"] = hooks.cache is not None
        bar.close()
        for p in student.parameters():
            p.grad = None
        student.eval()
        teacher.eval()
    return report


class _Hooks:
    """Forward hooks on teacher and student; ``loss(x)`` runs both on ``x`` and returns the summed
    relative error of the target layers' outputs. ``example`` (one input) shows which recorded
    teacher tensors the model later modifies in place (timm's ``x += shortcut`` after a norm, an
    in-place activation after a conv): those are copied when recorded, the rest kept as they are.
    When the first batch shows that the recordings of all ``images`` fit in ``cache_bytes``, each
    batch's are kept (``cache``) and replayed in later passes instead of running the teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, targets: dict[str, _Target],
                 feed: bool, example: torch.Tensor, cache_bytes: float = 0, images: int = 0) -> None:
        self.student, self.teacher, self.targets, self.feed = student, teacher, targets, feed
        self.example = example
        self.budget: float | None = cache_bytes  # None once the first batch has decided
        self.total_images = images
        self.cache: dict[Any, dict[str, dict[str, list[torch.Tensor]]]] | None = None
        self.mutated: set[tuple[str, str]] = set()  # the teacher's, and the student's below
        self.student_mutated: set[tuple[str, str]] = set()
        self.restore: list[nn.Module] = []  # the student's modules made out of place for a while
        self.outputs: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.inputs: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.terms: list[torch.Tensor] = []
        # an accelerator's deferred terms: each layer's output, the teacher's (and whether that
        # copy is ours to overwrite), then their difference, and its divisor and gradient factor
        # (see ``_defer``)
        self.deferred = device_of(student).type != "cpu"
        # the CPU copies the teacher's recordings into buffers reused every step (see ``_keep``)
        self.buffers = not self.deferred
        self.roots: list[torch.Tensor] = []
        self.refs: list[tuple[torch.Tensor, bool]] = []
        self.diffs: list[torch.Tensor] = []
        self.norms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.energy: _Norms = {}
        self.given = False
        self.pool: dict[tuple[str, str, int], torch.Tensor] = {}
        self.owned: set[int] = set()
        self.calls: collections.Counter = collections.Counter()
        self.handles: list[Any] = []

    def __enter__(self) -> "_Hooks":
        self.mutated = _modified_in_place(self.teacher, list(self.targets), self.example)
        if self.deferred:  # see ``_defer``: a module's in-place activation there costs a copy
            self.restore = _out_of_place(self.student)
            self.student_mutated = _modified_in_place(self.student, list(self.targets), self.example)
        for name, target in self.targets.items():
            self.handles.append(self.teacher.get_submodule(name).register_forward_hook(
                self._record(name, target)))
            module = self.student.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._score(name, target)))
            if self.feed:
                self.handles.append(module.register_forward_pre_hook(self._replace(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        for module in self.restore:
            module.inplace = True
        self.restore = []
        self.outputs.clear()
        self.inputs.clear()
        if self.cache is not None:
            self.cache.clear()  # the memory back now; ``cache`` stays a dict: it was used

    def loss(self, x: torch.Tensor, energy: _Norms | None = None,
             key: Any = None) -> torch.Tensor:
        """The summed relative errors on ``x``, each divided by the teacher's energy of that layer
        (its :func:`_norm`): ``energy`` when given (from :meth:`energies`, over the whole batch
        when ``x`` is one piece of it, or this attribute after an earlier call on the same ``x``),
        else computed here and left in ``self.energy``. ``key`` names ``x`` in the cache (the same input in
        every pass)."""
        self.outputs.clear()
        self.inputs.clear()
        self.owned.clear()
        if self.cache is not None and key in self.cache:
            self._replay(self.cache[key])
        else:
            with torch.no_grad():
                self.teacher(x)
            self._store(key, len(x))
        self.given = energy is not None
        self.energy = energy if energy is not None else collections.defaultdict(list)
        self.terms, self.calls = [], collections.Counter()
        self.roots, self.refs, self.diffs, self.norms = [], [], [], []
        self.student(x)
        if self.roots:
            return self._deferred_loss()
        terms, self.terms = self.terms, []
        return torch.stack(terms).sum() if terms else x.new_zeros((), requires_grad=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate the last :meth:`loss` (on an accelerator, from every layer's output at
        once with its gradient)."""
        if not self.diffs:
            loss.backward()
            return
        pairs = [(r, d) for r, d in zip(self.roots, self.diffs) if r.requires_grad]
        if pairs:  # (a layer before any trainable weight has nothing to pass back)
            torch.autograd.backward(*zip(*pairs))
        self.roots, self.diffs, self.norms = [], [], []

    def _deferred_loss(self) -> torch.Tensor:
        """The summed relative errors of the deferred layers, and their differences scaled into
        the gradients: a handful of multi-tensor operations for all layers together. The
        differences are taken here as well, in place in the recordings that are ours: two
        operations for all layers, where one per layer in the forward was a launch each."""
        values = [root.detach() for root in self.roots]
        self.diffs = [ref for ref, _ in self.refs]
        mine = [i for i, (_, own) in enumerate(self.refs) if own]
        theirs = [i for i, (_, own) in enumerate(self.refs) if not own]
        if mine:
            torch._foreach_sub_([self.diffs[i] for i in mine], [values[i] for i in mine])
        if theirs:
            for i, diff in zip(theirs, torch._foreach_sub([self.diffs[i] for i in theirs],
                                                          [values[i] for i in theirs])):
                self.diffs[i] = diff
        self.refs = []
        norms = torch.stack([n for n, _ in self.norms])
        errors = torch.stack(torch._foreach_norm(self.diffs, dtype=torch.float32)).square_()
        torch._foreach_mul_(self.diffs, [scale for _, scale in self.norms])
        return errors.div_(norms).sum()

    def energies(self, pieces: list[torch.Tensor]) -> _Norms:
        """Each target layer's loss divisor (:func:`_norm` of the squared norm of its selected
        teacher output), per call, over all the pieces of a batch."""
        total: dict[str, list[torch.Tensor]] = {}
        numel: dict[str, list[int]] = {}
        with torch.no_grad():
            for piece in pieces:
                self.outputs.clear()
                self.teacher(piece)
                for name, outs in self.outputs.items():
                    sums, sizes = [_energy(o) for o in outs], [o.numel() for o in outs]
                    prev = total.get(name)
                    total[name] = sums if prev is None else [a + b for a, b in zip(prev, sums)]
                    numel[name] = sizes if prev is None else [a + b for a, b in zip(numel[name], sizes)]
        self.outputs.clear()
        self.inputs.clear()
        return {name: [_norm(e, n) for e, n in zip(sums, numel[name])] for name, sums in total.items()}

    def _store(self, key: Any, images: int) -> None:
        """Keep this input's recordings when caching (deciding on the first), copying those the
        loss may overwrite."""
        queues = {"out": self.outputs, "in": self.inputs}
        if self.budget is not None:
            size = sum(t.numel() * t.element_size() for q in queues.values() for ts in q.values()
                       for t in ts)
            self.cache = {} if key is not None and size * self.total_images <= self.budget * images else None
            self.budget = None
        if self.cache is not None:
            self.cache[key] = {kind: {name: [t.clone() if id(t) in self.owned else t for t in ts]
                                      for name, ts in q.items()} for kind, q in queues.items()}

    def _replay(self, stored: dict[str, dict[str, list[torch.Tensor]]]) -> None:
        """Queue a cached input's recordings as the teacher's forward would have (on the CPU
        into the reused buffers, which the loss may overwrite; elsewhere as they are)."""
        for kind, queues in (("out", self.outputs), ("in", self.inputs)):
            for name, ts in stored[kind].items():
                queues[name].extend(self._keep((name, kind, n), t, None, False)
                                    for n, t in enumerate(ts))

    def _record(self, name: str, target: _Target) -> Callable:
        copy_out, copy_in = (name, "out") in self.mutated, (name, "in") in self.mutated

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self.outputs[name].append(self._keep((name, "out", len(self.outputs[name])), out,
                                                     target.teacher_out, copy_out))
            if self.feed and args and isinstance(args[0], torch.Tensor):
                self.inputs[name].append(self._keep((name, "in", len(self.inputs[name])), args[0],
                                                    target.teacher_in, copy_in))
        return hook

    def _keep(self, key: tuple[str, str, int], t: torch.Tensor, sel: Select,
              mutated: bool) -> torch.Tensor:
        """The selected channels of a recorded teacher tensor. On the CPU they are copied into a
        buffer reused every step, as fresh memory there costs a page fault per 4 KiB, more than
        the copy (a resnet18 step at 224×224: 1.45× the bare passes without it, 1.2× with it);
        elsewhere the tensor is kept as it is, or copied if the forward will modify it. The
        buffers and copies are ours (the loss may overwrite them); ``owned`` lists them."""
        if not self.buffers:
            picked = _pick(t, sel)
            if mutated and picked is t:
                picked = picked.clone()
            if picked is not t:
                self.owned.add(id(picked))
            return picked
        shape = list(t.shape)
        if not (sel is None or isinstance(sel, str)):
            shape[sel[0]] = len(sel[1])
        buf = self.pool.get(key)
        if buf is None or buf.dtype != t.dtype or buf.shape[1:] != tuple(shape[1:]) \
                or len(buf) < shape[0]:
            buf = self.pool[key] = t.new_empty(shape)
        buf = buf[:shape[0]]  # a smaller last batch uses the front of the buffer
        self.owned.add(id(buf))
        if sel is None or isinstance(sel, str):
            return buf.copy_(t)
        return torch.index_select(t, sel[0], sel[1], out=buf)

    def _score(self, name: str, target: _Target) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> torch.Tensor | None:
            if not isinstance(out, torch.Tensor) or not self.outputs[name]:
                return None
            ref = self.outputs[name].popleft()
            picked = _pick(out, target.student_out)
            call = self.calls[name]
            self.calls[name] += 1
            if self.given:
                norm = self.energy[name][call]
            else:
                norm = _norm(_energy(ref), ref.numel())
                self.energy[name].append(norm)
            if picked.shape != ref.shape:
                return None
            if self.deferred:
                return self._defer(name, out, picked, ref, norm)
            # a tensor the teacher's forward made may also be another layer's recorded input or
            # output: only our own copies are overwritten
            self.terms.append(_RelativeError.apply(picked, ref.to(picked.dtype), norm,
                                                   id(ref) in self.owned or ref.dtype != picked.dtype))
            return None
        return hook

    def _defer(self, name: str, out: torch.Tensor, picked: torch.Tensor, ref: torch.Tensor,
               norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """An accelerator's term: nothing computed now; the difference (in the activations'
        precision, as the gradient is) and the rest for all layers at once after the forward
        (:meth:`_deferred_loss`, which sums the squares in float32), and the gradient
        back-propagated from the layer outputs themselves, with no autograd function per layer:
        there each operation is a kernel launch, and the host time of the per-layer work
        outlasted the kernels (resnet50 on a GPU: about 340 µs per layer and step, the bare passes
        about 40 ms a step). An output the forward later modifies in place stays the root, and the
        forward goes on with a copy; the student's in-place activation modules compute out of
        place meanwhile (one operation where the copy and the in-place one were two: resnet50's
        relus after its norms, 33 a step), which leaves the in-place residual adds to copy."""
        self.roots.append(picked)
        self.refs.append((ref, id(ref) in self.owned))
        self.norms.append(norm)
        return out.clone() if picked is out and (name, "out") in self.student_mutated else None

    def _replace(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self.inputs[name] or not args:
                return None
            return (self.inputs[name].popleft(),) + tuple(args[1:])
        return hook


def _out_of_place(model: nn.Module) -> list[nn.Module]:
    """Switch the modules that compute in place (``inplace=True``: activations, dropout) to out of
    place; returns them, to switch back."""
    switched = [m for m in model.modules() if vars(m).get("inplace") is True]
    for m in switched:
        m.inplace = False
    return switched


def _modified_in_place(model: nn.Module, names: list[str], x: torch.Tensor) -> set[tuple[str, str]]:
    """(layer, "out" or "in") for each layer output or input that the rest of the forward on
    ``x`` modifies in place (its version counter moves after the layer has returned)."""
    seen: list[tuple[str, str, torch.Tensor, int]] = []
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                seen.append((name, "out", out, out._version))
            if args and isinstance(args[0], torch.Tensor):
                seen.append((name, "in", args[0], args[0]._version))
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with eval_mode(model), torch.no_grad():  # eval: one image, and no running statistics touched
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
    return {(name, kind) for name, kind, t, version in seen if t._version != version}


#: elements per chunk of the loss's elementwise work on the CPU: small enough to stay in cache
_CHUNK = 1 << 18


def _chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of a contiguous tensor's elements, chunked on the CPU (one piece elsewhere: each
    chunk is a kernel launch there, and the allocator reuses memory)."""
    return t.view(-1).split(_CHUNK if t.device.type == "cpu" else max(t.numel(), 1))


def _energy(t: torch.Tensor) -> torch.Tensor:
    """Squared norm, accumulated in float32 (``vector_norm`` over tens of millions of elements is
    off by about 1%). A float32 dot is vectorised where a bfloat16 one is not; on the CPU a
    reduced-precision tensor is converted in chunks that the allocator reuses, as a fresh
    full-size copy costs more in page faults than the arithmetic."""
    if t.dtype == torch.float32:
        flat = t.reshape(-1)
        return torch.dot(flat, flat)
    total = t.new_zeros((), dtype=torch.float32)
    for chunk in _chunks(t.contiguous()):
        chunk = chunk.float()
        total += torch.dot(chunk, chunk)
    return total


def _norm(energy: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's loss divisor, the teacher's energy there (infinity for a silent layer, at most
    1e-12 per element: a zero-initialised scale, say, whose term and gradient are then zero with
    no test on the host), and the gradient's factor −2/divisor: computed once per batch and
    layer, not at every step (on an accelerator each operation is a kernel launch)."""
    norm = torch.where(energy > 1e-12 * numel, energy, math.inf)
    return norm, -2 / norm


class _RelativeError(torch.autograd.Function):
    """``||out − ref||² / norm`` with the least memory traffic, as the loss touches every large
    activation: chunk by chunk, while the chunk is in cache, the difference is formed (into
    ``ref`` itself when ``reuse``: the caller owns it), squared and summed in float32, and scaled
    into the gradient. Backward then has nothing to compute when the loss is used unscaled, as
    ours is. Against ``vector_norm(out.float() − ref.float()).square()`` this cuts the loss's
    share of a resnet18 reconstruction step from 40% to about 15% on a CPU (``norm`` from
    :func:`_norm`). An accelerator, bound by the host's time per operation rather than by
    memory traffic, defers most of this work to all layers at once instead (``_Hooks._defer``)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, ref: torch.Tensor,
                norm: tuple[torch.Tensor, torch.Tensor], reuse: bool) -> torch.Tensor:
        if not (out.is_contiguous() and ref.is_contiguous()):
            reuse = reuse or not ref.is_contiguous()  # a contiguous copy is ours
            out, ref = out.contiguous(), ref.contiguous()
        diff = ref if reuse else torch.empty_like(ref)
        error: torch.Tensor | None = None
        # d/d out of ||out − ref||²/norm is 2(out − ref)/norm = −2(ref − out)/norm
        norm, scale = norm
        with torch.autocast(out.device.type, enabled=False):
            for d, o, r in zip(_chunks(diff), _chunks(out), _chunks(ref)):
                # float32: bfloat16 arithmetic is slower on the CPU than the conversions
                f = r.to(torch.float32, copy=not reuse)
                f.sub_(o)
                part = torch.dot(f, f)
                error = part if error is None else error.add_(part)
                f.mul_(scale)
                if f.data_ptr() != d.data_ptr():
                    d.copy_(f)
        ctx.save_for_backward(diff)
        return error / norm

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        diff, = ctx.saved_tensors  # the graph is never run twice, so diff is free to overwrite
        if grad.device.type != "cpu" or grad.item() != 1:  # no host sync on an accelerator
            diff = diff.mul_(grad)
        return diff, None, None, None


def _pick(t: torch.Tensor, sel: Select) -> torch.Tensor:
    if sel is None or isinstance(sel, str):
        return t
    dim, idx = sel
    return t.index_select(dim, idx)


def _selections(teacher: nn.Module, pruned: nn.Module, kept: Kept,
                x: torch.Tensor) -> dict[str, tuple[Select, Select]]:
    """For every hooked layer, how to pick the pruned model's (input, output) channels out of the
    teacher's: None (unchanged), (dim, kept indices) or UNMAPPED."""
    names = layer_names(teacher)
    full, small = _activation_shapes(teacher, names, x), _activation_shapes(pruned, names, x)
    device = device_of(teacher)  # the indices live where they are used, once
    out: dict[str, tuple[Select, Select]] = {}
    for name in names:
        if name not in full or name not in small:
            continue
        module = teacher.get_submodule(name)
        idx_out = _kept_out(kept.get(name, {}))
        idx_in = _kept_in(module, kept.get(name, {}), idx_out)
        out[name] = (_select(full[name][0], small[name][0], idx_in, device),
                     _select(full[name][1], small[name][1], idx_out, device))
    return out


def _select(full: tuple | None, small: tuple | None, idx: list[int] | None,
            device: torch.device) -> Select:
    if full is None or small is None or len(full) != len(small):
        return UNMAPPED
    dims = [d for d, (a, b) in enumerate(zip(full, small)) if a != b]
    if not dims:
        return None
    if len(dims) == 1 and idx is not None and len(idx) == small[dims[0]]:
        return dims[0], torch.as_tensor(idx, dtype=torch.long, device=device)
    return UNMAPPED


def _kept_out(tensors: dict[str, dict[int, list[int]]]) -> list[int] | None:
    for name in ("weight", "running_mean", "bias"):
        if 0 in tensors.get(name, {}):
            return tensors[name][0]
    return None


def _kept_in(module: nn.Module, tensors: dict[str, dict[int, list[int]]],
             idx_out: list[int] | None) -> list[int] | None:
    if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1):
        return tensors.get("weight", {}).get(1)
    if isinstance(module, nn.modules.conv._ConvNd):  # grouped: whole conv groups go together
        if idx_out is None:
            return None
        per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
        kept_groups = sorted({i // per_out for i in idx_out})
        return [g * per_in + i for g in kept_groups for i in range(per_in)]
    return idx_out  # norms: input channels are output channels


def _activation_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """(input shape, output shape) of each named layer's first call on ``x``."""
    shapes: dict[str, tuple] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if name not in shapes:
                arg = args[0] if args and isinstance(args[0], torch.Tensor) else None
                shapes[name] = (tuple(arg.shape) if arg is not None else None,
                                tuple(out.shape) if isinstance(out, torch.Tensor) else None)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with eval_mode(model), torch.no_grad():
        try:
            model(x.to(device_of(model)))
        finally:
            for h in handles:
                h.remove()
    return shapes


def _param_groups(model: nn.Module, x: torch.Tensor, lr: float, balanced: bool,
                  order: str, relative: bool = False) -> list[dict]:
    """Adam parameter groups: one per module owning parameters, layer k of L (in ``order``) at
    ``lr/(L−k+1)`` when ``balanced``; modules the forward never reaches are left out. ``relative``:
    one group per tensor, its rate also scaled by the tensor's RMS (at least ``RELATIVE_FLOOR``)."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    called: list[nn.Module] = []
    seen: set[int] = set()

    def hook(module: nn.Module, args: tuple) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            called.append(module)
    handles = [m.register_forward_pre_hook(hook) for m in owners]
    with eval_mode(model), torch.no_grad():
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
    ordered = called if order == "execution" else [m for m in owners if id(m) in seen]
    groups, taken = [], set()
    for k, module in enumerate(ordered):
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in params)
        rate = lr / (len(ordered) - k) if balanced else lr
        if relative:
            groups += [{"params": [p], "lr": rate * max(_rms(p), RELATIVE_FLOOR)} for p in params]
        elif params:
            groups.append({"params": params, "lr": rate})
    return groups


def _rms(p: torch.Tensor) -> float:
    """The root mean square of a tensor's values: its scale."""
    return float(p.detach().float().square().mean().sqrt())


class _Adam:
    """Adam as torch's (its defaults, no weight decay, the same arithmetic in the same order)
    with a learning rate per parameter, stepping all of them with seven multi-tensor operations.
    torch's Adam steps its parameter groups one at a time in Python, and the balanced update
    needs a group per layer: on a GPU, where every operation is a kernel launch, that host work
    took longer than the kernels (resnet50's 107 groups on an H200: 3.5 ms a step, 1.3 ms
    here)."""

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [p for g in groups for p in g["params"]]
        self.lrs = [g["lr"] for g in groups for _ in g["params"]]
        self.betas, self.eps = betas, eps
        self.steps = [0] * len(self.params)  # per parameter, as torch counts: steps it had a grad
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        for i in live:
            self.steps[i] += 1
            if i not in self.moments:
                p = self.params[i]
                self.moments[i] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                   torch.zeros_like(p, memory_format=torch.preserve_format))
        beta1, beta2 = self.betas
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        firsts = [self.moments[i][0] for i in live]
        seconds = [self.moments[i][1] for i in live]
        torch._foreach_lerp_(firsts, grads, 1 - beta1)
        torch._foreach_mul_(seconds, beta2)
        torch._foreach_addcmul_(seconds, grads, grads, 1 - beta2)
        denominators = torch._foreach_sqrt(seconds)
        torch._foreach_div_(denominators, [(1 - beta2 ** self.steps[i]) ** 0.5 for i in live])
        torch._foreach_add_(denominators, self.eps)
        torch._foreach_addcdiv_(params, firsts, denominators,
                                [-(self.lrs[i] / (1 - beta1 ** self.steps[i])) for i in live])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _augment(x: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """The batch ``x`` varied for one step, so that a few hundred images give more distinct inputs
    to match: "flip" mirrors a random half of the images left to right, "shift" also moves each by
    up to an eighth of its side (edges repeated), "mixup" blends each image with another of the
    batch at a uniform random weight, "cutmix" pastes in a random square of another."""
    if how in ("flip", "shift"):
        flip = (torch.rand(len(x), generator=generator) < 0.5).view(-1, *(1,) * (x.dim() - 1))
        x = torch.where(flip.to(x.device), x.flip(-1), x)
        if how == "flip":
            return x
        height, width = x.shape[-2:]
        pad = max(1, min(height, width) // 8)
        padded = F.pad(x, (pad,) * 4, mode="replicate")
        offsets = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=generator).tolist()
        return torch.stack([p[..., dy:dy + height, dx:dx + width] for p, (dy, dx) in zip(padded, offsets)])
    other = x[torch.randperm(len(x), generator=generator).to(x.device)]
    if how == "mixup":
        weight = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator)
        return torch.lerp(other, x, weight.to(x.device, x.dtype))
    height, width = x.shape[-2:]
    shorter = min(height, width)
    side = int(torch.randint(max(1, shorter // 4), max(shorter, 2), (1,), generator=generator))
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    mixed = x.clone()
    mixed[..., top:top + side, left:left + side] = other[..., top:top + side, left:left + side]
    return mixed


def _pieces(x: torch.Tensor, size: int | None) -> tuple[torch.Tensor, ...]:
    """``x`` in pieces of ``size`` images; a last piece of one joins the one before (BatchNorm in
    train mode needs two images)."""
    if size is None or size >= len(x):
        return (x,)
    pieces = list(x.split(size))
    if len(pieces[-1]) == 1:
        pieces[-2:] = [torch.cat(pieces[-2:])]
    return tuple(pieces)


def join_single_images(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration batches with each one-image batch (a loader's last, typically) joined to
    the one before, as BatchNorm in train mode needs two images per batch."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return batches
    if sum(len(b) for b in batches) < 2:
        raise ValueError("BatchNorm in train mode needs at least two calibration images; pass "
                         "more, or Reconstruction(bn='reestimate')")
    joined: list[torch.Tensor] = []
    for b in batches:
        if joined and (len(b) == 1 or len(joined[-1]) == 1):
            joined[-1] = torch.cat([joined[-1], b])
        else:
            joined.append(b)
    return joined


def autocast(device: torch.device, amp: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``amp`` and the device computes bfloat16 natively."""
    if amp and (device.type == "cuda" or (device.type == "cpu" and _native_cpu_bf16())):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def _native_cpu_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (torch's own probes; private, so a
    torch without them counts as no)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def _cache_bytes(gib: float | None, device: torch.device) -> float:
    """The teacher cache's budget in bytes: ``gib``, or (None) half the memory available now on
    ``device`` (0 where that is unknown)."""
    if gib is not None:
        return gib * 2**30
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2
    if device.type != "cpu":
        return 0
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 / 2
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
        except (ValueError, OSError, AttributeError):
            return 0


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
