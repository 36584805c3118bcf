"""DHSPG (OTOv2's Dual Half-Space Projected Gradient) on ptsp's groups: train once from scratch
while whole channel groups are driven to exactly zero, then compress to a smaller model that
computes the same function.

One DHSPG group is one channel of a prunable ptsp group; its vector ``x_g`` is every parameter
slice that produces the channel (conv/linear rows and biases, norm scale and shift, per-channel
parameters such as layer scales or position embeddings), never the consumers' input columns and
never buffers. A channel whose producers are all zero outputs zero only if every op on its way to
its consumers maps zero to zero, so candidates are checked numerically once ("zero-invariant"):
channels that cross a normalisation over channels, or pass through ``sigmoid`` into a consumer,
say, are not candidates. Compression then removes exactly the zero channels with ptsp's surgery.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .counting import Estimator, count
from .groups import CONSUMER_ROLES, Groups, build_groups
from .pruning import PLAN_ATTR, default_inputs, record
from .surgery import apply, broadcast_mask, kept_indices, zero_removed_inputs

VARIANTS = ("sgd", "adam", "adamw")
#: OTOv2's defaults per base optimiser: (lmbda, lmbda_amplify, hat_lmbda_coeff)
LEGACY = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}
#: relative output change above which zeroing a channel's producers is not zero-invariant
INVARIANCE_TOL = 1e-5


class DHSPG(torch.optim.Optimizer):
    """The Dual Half-Space Projected Gradient optimiser over the channels of ``model``'s groups.

    Steps up to the partition step are the plain base optimiser. At the partition step the
    ⌊(target + tolerance)·|G|⌋ channels scored most redundant (direction aligned with the weights,
    small magnitude) form the fixed redundant set. From then on their trial step also shrinks them
    along ``-x_g/‖x_g‖`` with an adaptive λ_g, and after the half-space step a group whose trial
    point leaves the half-space ``⟨x̂_g, x_g⟩ ≥ ε‖x_g‖²`` is set to zero. Zero groups stay zero.
    Two ptsp additions make the target reliable (OTO users' most common complaint): projection
    never zeroes more groups than the target needs (no overshoot by the tolerance), and
    ``pruning_steps`` after the partition the redundant groups still needed are projected,
    smallest first (no target missed because λ or ε were weak). Once the target is reached the
    penalty stops for good and training continues with the base optimiser. A third lets the
    target be a FLOPs reduction (``target_flops``), as users compare models at equal cost.

    Args (OTOv2's names and defaults; λ, κ and c default by variant as OTOv2's do):
        model: the model being trained; its parameters are optimised.
        example_inputs: one input batch to trace the model (default: from its timm data config).
        groups: ptsp groups of ``model`` (built from ``example_inputs`` when not given).
        lr: learning rate α. variant: "sgd" (with momentum), "adam" or "adamw".
        lmbda, lmbda_amplify, hat_lmbda_coeff: λ, κ and c of the adaptive penalty.
        epsilon: half-space parameter ε in [0, 1) (0: project only groups whose trial point
            crosses the origin's half-space; tutorials use 0.9-0.95).
        target_group_sparsity: fraction of candidate groups to zero, in (0, 1).
        target_flops: fraction of the model's FLOPs to remove, in (0, 1), instead of a group
            sparsity (ptsp's addition): at the partition step the redundant set is taken evenly
            across the ptsp groups (the most redundant channels of each), and the target becomes
            the fewest such channels whose removal cuts the FLOPs by this much. Evenly, as the
            score alone picks the cheap late channels first: on resnet10t halving the FLOPs so
            took 79% of the groups and left 35% top-1 (dense 92%). Zeroed are the smallest of
            the redundant set, so the FLOPs cut is this to within one channel when
            ``tolerance_group_sparsity=0`` (the redundant set is then exactly those channels)
            and close to it otherwise.
        tolerance_group_sparsity: extra fraction in the redundant set.
        start_pruning_steps: sets ``partition_step`` and ``half_space_project_steps`` unless given.
        warm_up_steps: plain steps before any partition.
        pruning_steps: steps after the partition by which the target is forced (default: as many
            as the partition step, at least 1; ``math.inf``: never, OTOv2's behaviour).
        first_momentum, second_momentum, dampening: SGD momentum (default 0) / Adam betas
            (default 0.9, 0.999) and SGD dampening.
        weight_decay, weight_decay_type: decay added to the gradient ("l2"), or applied to the
            weights ("decoupled", always so for adamw).
        group_divisible: kept channels of each ptsp group are a multiple of this after compression.
        fixed_zero_groups: zero groups stay zero for the rest of training.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, groups: Groups | None = None,
                 lr: float = 0.1, variant: str = "sgd", lmbda: float | None = None,
                 lmbda_amplify: float | None = None, hat_lmbda_coeff: float | None = None,
                 epsilon: float = 0.0, target_group_sparsity: float = 0.5,
                 target_flops: float | None = None,
                 tolerance_group_sparsity: float = 0.05, start_pruning_steps: int = 0,
                 partition_step: int | None = None, half_space_project_steps: int | None = None,
                 warm_up_steps: int = 0, pruning_steps: float | None = None,
                 first_momentum: float | None = None, second_momentum: float = 0.999,
                 dampening: float = 0.0, weight_decay: float = 0.0, weight_decay_type: str = "l2",
                 group_divisible: int = 1, fixed_zero_groups: bool = True, adam_eps: float = 1e-8) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        legacy = dict(zip(("lmbda", "lmbda_amplify", "hat_lmbda_coeff"), LEGACY[variant]))
        lmbda = legacy["lmbda"] if lmbda is None else lmbda
        lmbda_amplify = legacy["lmbda_amplify"] if lmbda_amplify is None else lmbda_amplify
        hat_lmbda_coeff = legacy["hat_lmbda_coeff"] if hat_lmbda_coeff is None else hat_lmbda_coeff
        first_momentum = (0.0 if variant == "sgd" else 0.9) if first_momentum is None else first_momentum
        partition_step = start_pruning_steps if partition_step is None else partition_step
        half_space = start_pruning_steps if half_space_project_steps is None else half_space_project_steps
        pruning_steps = max(partition_step, warm_up_steps, 1) if pruning_steps is None else pruning_steps
        _check("target_group_sparsity", target_group_sparsity, 0, 1, "(0, 1)", open_low=True, open_high=True)
        if target_flops is not None:
            _check("target_flops", target_flops, 0, 1, "(0, 1)", open_low=True, open_high=True)
        _check("tolerance_group_sparsity", tolerance_group_sparsity, 0, 1, "[0, 1)", open_high=True)
        _check("epsilon", epsilon, 0, 1, "[0, 1)", open_high=True)
        _check("first_momentum", first_momentum, 0, 1, "[0, 1)", open_high=True)
        _check("second_momentum", second_momentum, 0, 1, "[0, 1)", open_high=True)
        _check("dampening", dampening, 0, 1, "[0, 1]")
        for name, value in (("lr", lr), ("lmbda", lmbda), ("weight_decay", weight_decay), ("adam_eps", adam_eps)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if lmbda_amplify < 1 or hat_lmbda_coeff < 1:
            raise ValueError(f"lmbda_amplify and hat_lmbda_coeff must be >= 1, got {lmbda_amplify}, {hat_lmbda_coeff}")
        for name, value in (("start_pruning_steps", start_pruning_steps), ("partition_step", partition_step),
                            ("half_space_project_steps", half_space), ("warm_up_steps", warm_up_steps),
                            ("group_divisible", group_divisible)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "group_divisible" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'group_divisible' else 0}, got {value!r}")
        if not (pruning_steps == math.inf or (isinstance(pruning_steps, int) and pruning_steps >= 1)):
            raise ValueError(f"pruning_steps must be a positive integer or math.inf, got {pruning_steps!r}")
        if weight_decay_type not in ("l2", "decoupled"):
            raise ValueError(f"weight_decay_type must be 'l2' or 'decoupled', got {weight_decay_type!r}")
        defaults = dict(lr=lr, variant=variant, lmbda=lmbda, lmbda_amplify=lmbda_amplify,
                        hat_lmbda_coeff=hat_lmbda_coeff, epsilon=epsilon,
                        first_momentum=first_momentum, second_momentum=second_momentum,
                        dampening=dampening, weight_decay=weight_decay,
                        weight_decay_type="decoupled" if variant == "adamw" else weight_decay_type,
                        adam_eps=adam_eps)
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self._target_group_sparsity = float(target_group_sparsity)
        self.tolerance = float(tolerance_group_sparsity)
        self.partition_step = max(partition_step, warm_up_steps)
        self.half_space_step = max(half_space, self.partition_step)
        self.pruning_steps = pruning_steps
        self.group_divisible = group_divisible
        self.fixed_zero_groups = fixed_zero_groups
        inputs = _on(default_inputs(model) if example_inputs is None else example_inputs, model)
        self.groups = groups if groups is not None else build_groups(model, inputs)
        self.channels, self.parts = _candidates(model, self.groups, inputs)
        self._slices = _producer_slices(model, self.groups, self.channels)
        self.target_flops = None if target_flops is None else float(target_flops)
        self._estimator = None
        if target_flops is not None:
            owner = np.empty(self.groups.num_channels, dtype=np.int64)
            for g in self.groups:
                owner[g.ids] = g.index
            self._group_of = owner[self.channels]  # each candidate's ptsp group
            self._estimator = Estimator(model, self.groups, inputs)
            most = _pick(self.parts, np.arange(self.num_groups), np.zeros(self.num_groups, dtype=bool),
                         self.num_groups)
            if not self._meets_flops(most):
                raise ValueError(f"target_flops={target_flops} cannot be reached: zeroing every "
                                 "candidate group that may go removes less")
        # the group sparsity target lives in the state: with target_flops it is set at the
        # partition, and a resumed run must find it
        self.state["dhspg"] = {"step": 0, "redundant": None, "zero": None, "done": False,
                               "target": self._target_group_sparsity}

    # -- what users log --------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Number of candidate groups |G| (zero-invariant channels of prunable groups)."""
        return len(self.channels)

    @property
    def group_sparsity(self) -> float:
        """Fraction of candidate groups that are exactly zero now."""
        return float(self._zero().sum()) / max(self.num_groups, 1)

    @property
    def redundant_groups(self) -> np.ndarray | None:
        """Global channel ids of the redundant set (None before the partition step)."""
        redundant = self.state["dhspg"]["redundant"]
        return None if redundant is None else self.channels[redundant.cpu().numpy()]

    @property
    def target(self) -> float:
        """The target group sparsity (with ``target_flops``: the one it needs, from the partition)."""
        return self.state["dhspg"].get("target", self._target_group_sparsity)  # (older states)

    @property
    def target_reached(self) -> bool:
        return bool(self.state["dhspg"]["done"])

    def zero_channels(self) -> np.ndarray:
        """Global channel ids of the candidate groups that are exactly zero."""
        return self.channels[self._zero().cpu().numpy()]

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        st = self.state["dhspg"]
        st["step"] += 1
        directions = self._directions()
        if st["redundant"] is None and st["step"] > self.partition_step:
            st["redundant"] = self._partition(directions)
            st["zero"] = self._zero()
        active = st["redundant"] is not None and not st["done"]
        shrink, ratio, trial = self._shrink(directions) if active else (None, None, None)
        for group in self.param_groups:
            for p in group["params"]:
                if p in directions:
                    if shrink is not None:
                        self._scale(p, 1 - shrink)
                    p.add_(directions[p], alpha=-group["lr"])
        if active:
            self._project(ratio, trial, st)
        if self.fixed_zero_groups and st["zero"] is not None:
            self._set_zero(st["zero"])
        return loss

    def _directions(self) -> dict[torch.Tensor, torch.Tensor]:
        """The base optimiser's step direction d per parameter (lr not applied), updating its state."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                wd = group["weight_decay"]
                if wd and group["weight_decay_type"] == "l2":
                    grad = grad.add(p, alpha=wd)
                elif wd:
                    p.mul_(1 - group["lr"] * wd)
                state = self.state[p]
                beta1 = group["first_momentum"]
                if group["variant"] == "sgd":
                    if beta1:
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = state["momentum_buffer"] = grad.clone()
                        else:
                            buf.mul_(beta1).add_(grad, alpha=1 - group["dampening"])
                        grad = buf
                    out[p] = grad
                    continue
                beta2 = group["second_momentum"]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                out[p] = m_hat / (v_hat.sqrt() + group["adam_eps"])
        return out

    def _sums(self, *fns: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
              directions: dict | None = None) -> torch.Tensor:
        """Per candidate group, the sum over its producer slices of each ``fn(x, d)``, where ``x``
        and ``d`` (the direction, if given) are a slice's rows and ``fn`` gives one value per
        row; one pass over the parameters, a ``[len(fns), |G|]`` tensor."""
        device = next(iter(self._slices)).device if self._slices else torch.device("cpu")
        total = torch.zeros(len(fns), self.num_groups + 1, dtype=torch.float64, device=device)
        for p, slices in self._slices.items():
            d = directions.get(p) if directions else None
            for dims, ids in slices:
                x, dr = _rows(p.detach(), dims), (None if d is None else _rows(d, dims))
                idx = ids.to(device).reshape(-1)
                for k, fn in enumerate(fns):
                    value = fn(x, dr)
                    if value is not None:
                        total[k].index_add_(0, idx, value.to(device, torch.float64))
        return total[:, :-1]

    def _zero(self) -> torch.Tensor:
        return self._sums(lambda x, d: x.abs().sum(1))[0] == 0

    def _stats(self, directions: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per group ‖x_g‖, ⟨x_g, d_g⟩ and ‖d_g‖² (fused reductions: this runs every step while
        the penalty is active, so it must stay cheap next to a backward pass)."""
        xx, xd, dd = self._sums(lambda x, d: torch.linalg.vector_norm(x, dim=1).square(),
                                lambda x, d: None if d is None else (x * d).sum(1),
                                lambda x, d: None if d is None else torch.linalg.vector_norm(d, dim=1).square(),
                                directions=directions)
        return xx.sqrt(), xd, dd

    def _scale(self, p: torch.Tensor, factor: torch.Tensor) -> None:
        """Multiply each producer slice of ``p`` by its group's entry of ``factor``."""
        ext = torch.cat([factor, factor.new_ones(1)])
        for dims, ids in self._slices.get(p, ()):
            f = ext.to(p.device)[ids].to(p.dtype)
            p.mul_(broadcast_mask(f, dims, p.dim()))

    def _set_zero(self, zero: torch.Tensor) -> None:
        """Zero the groups in ``zero``: their producer slices and the optimiser state there."""
        if zero.any():
            factor = (~zero).double()
            for p in self._slices:
                self._scale(p, factor)
                for buf in self.state[p].values():
                    if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                        self._scale(buf, factor)

    def _partition(self, directions: dict) -> torch.Tensor:
        """The redundant set: top ⌊(target+tolerance)·|G|⌋ by 0.5·cos(x, d) + 0.5/mean|x| (each
        term divided by its largest magnitude), never a whole ptsp group or producer. With
        ``target_flops`` the order is spread evenly over the ptsp groups, and the target set to
        the fewest groups of it that cut the FLOPs enough."""
        norms, xd, dd = self._stats(directions)
        cos = torch.where(norms * dd.sqrt() > 0, xd / (norms * dd.sqrt()).clamp_min(1e-30), 0)
        abs_sum, count = self._sums(lambda x, d: x.abs().sum(1), lambda x, d: x.new_full((len(x),), x.shape[1]))
        mean_abs = abs_sum / count
        inv = torch.where(mean_abs > 0, 1 / mean_abs.clamp_min(1e-30), 0)
        score = 0.5 * cos / cos.abs().max().clamp_min(1e-30) + 0.5 * inv / inv.abs().max().clamp_min(1e-30)
        score = torch.where(mean_abs > 0, score, torch.full_like(score, math.inf))  # zero: redundant
        order = torch.argsort(score.cpu(), descending=True, stable=True).numpy()
        none = np.zeros(self.num_groups, dtype=bool)
        if self.target_flops is not None:  # the fewest groups, in this order, that cut enough
            order = self._evenly(order)
            lo, hi = 0, self.num_groups
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if self._meets_flops(_pick(self.parts, order, none, mid)) else (mid + 1, hi)
            self.state["dhspg"]["target"] = lo / self.num_groups
        want = math.floor(min(self.target + self.tolerance, 1.0) * self.num_groups + 1e-9)
        return torch.as_tensor(_pick(self.parts, order, none, want), device=score.device)

    def _evenly(self, order: np.ndarray) -> np.ndarray:
        """``order`` interleaved across the ptsp groups: each group's candidates keep their order
        and any prefix holds about the same fraction of every group."""
        group = self._group_of[order]
        sizes = np.bincount(self._group_of)
        rank = np.empty(len(order))
        seen: dict[int, int] = {}
        for j, g in enumerate(group.tolist()):
            rank[j] = (seen.get(g, 0) + 0.5) / sizes[g]
            seen[g] = seen.get(g, 0) + 1
        return order[np.argsort(rank, kind="stable")]

    def _meets_flops(self, taken: np.ndarray) -> bool:
        """Whether removing the candidate groups ``taken`` cuts the FLOPs by ``target_flops``."""
        removed = np.zeros(self.groups.num_channels, dtype=bool)
        removed[self.channels[taken]] = True
        goal = (1 - self.target_flops) * self._estimator.flops_before
        return self._estimator.flops(removed) <= goal

    def _shrink(self, directions: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per group, the factor s = α·λ_g/‖x_g‖ of the shrinking term, and the half-space ratio
        ⟨x̂_g, x_g⟩/‖x_g‖² = (1 − s) − α⟨d_g, x_g⟩/‖x_g‖² of the trial point x̂ = (1 − s)·x − α·d,
        and ‖x̂_g‖."""
        group = self.param_groups[0]
        lr, lmbda = group["lr"], group["lmbda"]
        kappa, c = group["lmbda_amplify"], group["hat_lmbda_coeff"]
        norms, xd, dd = self._stats(directions)
        lam = torch.full_like(norms, lmbda)
        grows = (xd < 0) & (norms > 0)
        lam_min = -xd / norms.clamp_min(1e-30)
        lam_max = -dd * norms / xd.clamp_max(-1e-30)
        adaptive = (kappa * lam_min).clamp(lmbda, c * lmbda)
        adaptive = torch.where(adaptive >= lam_max, (lam_min + lam_max) / 2, adaptive)
        lam = torch.where(grows, adaptive, lam)
        redundant = self.state["dhspg"]["redundant"].to(norms.device) & (norms > 0)
        shrink = torch.where(redundant, lr * lam / norms.clamp_min(1e-30), 0).clamp_max(1.0)
        ratio = torch.where(redundant, (1 - shrink) - lr * xd / norms.square().clamp_min(1e-30), math.inf)
        # ‖x̂‖ of the trial point, without another pass over the weights
        trial = ((1 - shrink).square() * norms.square() - 2 * lr * (1 - shrink) * xd
                 + lr * lr * dd).clamp_min(0).sqrt()
        return shrink, ratio, trial

    def _project(self, ratio: torch.Tensor, norms: torch.Tensor, st: dict) -> None:
        """Half-space projection of redundant groups, never more than the target needs; at the
        deadline, the smallest redundant groups still needed (``norms``: of the trial point).
        Zeroed groups join ``st["zero"]``."""
        zero = st["zero"]
        need = math.ceil(self.target * self.num_groups - 1e-9) - int(zero.sum())
        if need > 0 and st["step"] > self.half_space_step:
            eligible = ~zero & (ratio < self.param_groups[0]["epsilon"])
            chosen = _smallest(torch.where(eligible, norms, math.inf), need)
            zero |= chosen
            need -= int(chosen.sum())
        if need > 0 and st["step"] - self.partition_step >= self.pruning_steps:
            alive = st["redundant"].to(zero.device) & ~zero
            if int(alive.sum()) >= need:
                zero |= _smallest(torch.where(alive, norms, math.inf), need)
            else:  # the redundant set ran short: the smallest of the rest that leave survivors
                order = torch.argsort(norms.cpu(), stable=True).numpy()
                zero = torch.as_tensor(_pick(self.parts, order, zero.cpu().numpy(), need),
                                       device=zero.device)
        st["zero"] = zero
        self._set_zero(zero)
        if int(zero.sum()) >= math.ceil(self.target * self.num_groups - 1e-9):
            st["done"] = True


class OTO:
    """OTOv2's workflow on ptsp's groups: ``oto = OTO(model, example_inputs)``, train with
    ``optimizer = oto.dhspg(lr=..., target_group_sparsity=0.5)``, then ``slim = oto.compress()``."""

    def __init__(self, model: nn.Module, example_inputs: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.inputs = default_inputs(model) if example_inputs is None else example_inputs
        self.groups = build_groups(model, self.inputs)
        self.optimizer: DHSPG | None = None

    def dhspg(self, **hyperparameters: Any) -> DHSPG:
        """A :class:`DHSPG` over this model's groups (keywords as in DHSPG)."""
        self.optimizer = DHSPG(self.model, self.inputs, groups=self.groups, **hyperparameters)
        return self.optimizer

    def compress(self) -> nn.Module:
        """A physically smaller copy of the model without its zero groups, with a plan, computing
        what the trained model computes. Zero groups are read from the parameters."""
        if self.optimizer is None:
            raise RuntimeError("call oto.dhspg(...) and train before compress()")
        opt = self.optimizer
        removed = np.zeros(self.groups.num_channels, dtype=bool)
        removed[opt.zero_channels()] = True
        q = opt.group_divisible
        for g in self.groups:  # kept channels a multiple of q: keep some zero channels
            gone = np.flatnonzero(removed[g.ids])
            extra = (g.channels - len(gone)) % q
            if extra and len(gone):
                removed[g.ids[gone[:q - extra]]] = False
        kept = kept_indices(self.groups, removed)
        slim = apply(copy.deepcopy(self.model), kept).eval()
        inputs = _on(self.inputs, self.model)  # traced on the CPU, say, then trained on a GPU
        before = count(self.model, inputs)
        settings = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        plan = {"method": "dhspg",
                "dhspg": {**settings, "target_group_sparsity": opt.target, "target_flops": opt.target_flops,
                          "tolerance_group_sparsity": opt.tolerance, "group_divisible": q,
                          "steps": opt.state["dhspg"]["step"]},
                **record(self.model, slim, self.groups, removed, kept, inputs, before),
                "report": {"group_sparsity": opt.group_sparsity, "groups": opt.num_groups}}
        setattr(slim, PLAN_ATTR, plan)
        return slim


def _on(inputs: Any, model: nn.Module) -> Any:
    """Example inputs (a tensor or a tuple) on the device of the model's parameters."""
    p = next(iter(model.parameters()), None)
    if p is None:
        return inputs
    if isinstance(inputs, tuple):
        return tuple(_on(x, model) for x in inputs)
    return inputs.to(p.device) if isinstance(inputs, torch.Tensor) else inputs


def _check(name: str, value: Any, low: float, high: float, text: str, *, open_low: bool = False,
           open_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        raise ValueError(f"{name} must be in {text}, got {value!r}")


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest finite entries of ``values``."""
    out = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    finite = torch.isfinite(values)
    k = min(k, int(finite.sum()))
    if k > 0:
        out[torch.topk(values.masked_fill(~finite, math.inf), k, largest=False).indices] = True
    return out


def _rows(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` as a matrix with one row per position along ``dims`` (a view when dims lead)."""
    lead = tuple(range(len(dims)))
    if dims != lead:
        t = t.movedim(dims, lead)
    n = math.prod(t.shape[:len(dims)])
    return t.reshape(n, -1)


def _pick(parts: list[np.ndarray], order: np.ndarray, taken: np.ndarray, k: int) -> np.ndarray:
    """``taken`` plus up to ``k`` more entries of ``order``, in order, skipping any that would
    leave a part (a set of candidate groups) with none outside the result."""
    taken = taken.copy()
    left = np.array([len(p) - int(taken[p].sum()) for p in parts])
    parts_of: dict[int, list[int]] = {}
    for j, p in enumerate(parts):
        for i in p.tolist():
            parts_of.setdefault(i, []).append(j)
    for i in order.tolist():
        if k <= 0:
            break
        if taken[i] or any(left[j] <= 1 for j in parts_of.get(i, ())):
            continue
        taken[i] = True
        left[parts_of.get(i, [])] -= 1
        k -= 1
    return taken


def _producer_slices(model: nn.Module, groups: Groups,
                     channels: np.ndarray) -> dict[nn.Parameter, list[tuple[tuple[int, ...], torch.Tensor]]]:
    """Per parameter, (dims, candidate-group index per position) of every producer slice."""
    index = np.full(groups.num_channels + 1, len(channels), dtype=np.int64)
    index[channels] = np.arange(len(channels))
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = set(channels.tolist())
    out: dict[nn.Parameter, list] = {}
    for g in groups:
        if not wanted.intersection(g.ids.tolist()):
            continue
        for m in g.members:
            if m.role in CONSUMER_ROLES or m.tensor not in params:
                continue
            p = params[m.tensor]
            ids = torch.as_tensor(index[m.channel], device=p.device)
            out.setdefault(p, []).append((tuple(m.dims), ids))
    return out


def _candidates(model: nn.Module, groups: Groups, inputs: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """(global channel ids of the candidate groups, the parts): candidates are the channels of
    prunable groups that do not cross a channel normalisation and are zero-invariant; a part is a
    set of candidates of which one must survive: a whole ptsp group, or the channels one member
    indexes when it indexes only some (one producer of a concat must keep an output channel)."""
    usable = [g for g in groups if g.prunable and not g.norm_crossing and g.channels > 1]
    bad = _not_invariant(model, groups, usable, inputs)
    usable = [g for g in usable if g.index not in bad]
    if not usable:
        raise ValueError("the model has no zero-invariant prunable channel groups for DHSPG")
    channels = np.concatenate([g.ids for g in usable])
    index = {int(c): i for i, c in enumerate(channels.tolist())}
    parts = []
    for g in usable:
        sets = {tuple(g.ids.tolist())} | {tuple(np.unique(m.channel[m.channel >= 0]).tolist())
                                           for m in g.members}
        parts += [np.array([index[c] for c in s]) for s in sets if s]
    return channels, parts


def _not_invariant(model: nn.Module, groups: Groups, candidates: list, inputs: Any) -> set[int]:
    """Indices of candidate groups whose channel, with all its producer parameters zero, still
    reaches its consumers as a non-zero value. One channel per group is tested; subsets of groups
    that fail are split in half until the culprits are found."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    params = dict(model.named_parameters(remove_duplicate=False))

    def invariant(subset: list) -> bool:
        removed = np.zeros(groups.num_channels, dtype=bool)
        for g in subset:
            removed[g.ids[len(g.ids) // 2]] = True
        test = copy.deepcopy(model).eval()
        tensors = dict(test.named_parameters(remove_duplicate=False))
        ext = np.append(removed, False)
        with torch.no_grad():
            for g in subset:
                for m in g.members:
                    if m.role not in CONSUMER_ROLES and m.tensor in params and ext[m.channel].any():
                        t = tensors[m.tensor]
                        t.masked_fill_(broadcast_mask(torch.as_tensor(ext[m.channel], device=t.device), m.dims, t.dim()), 0)
            y = test(*args)
            y_ref = zero_removed_inputs(test, groups, removed)(*args)
        scale = y_ref.abs().max().clamp_min(1e-12)
        return bool(((y - y_ref).abs().max() / scale) <= INVARIANCE_TOL)

    bad: set[int] = set()

    def search(subset: list) -> None:
        if not subset or invariant(subset):
            return
        if len(subset) == 1:
            bad.add(subset[0].index)
            return
        half = len(subset) // 2
        search(subset[:half])
        search(subset[half:])

    search(list(candidates))
    return bad
