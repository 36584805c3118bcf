"""ptsp against what users would pick instead, side by side, from one command.

    accelerate launch recipes/compare.py                                   # every reference model
    accelerate launch recipes/compare.py --models resnet10t --finetune-epochs 1
    accelerate launch --multi_gpu --num_processes 2 recipes/compare.py ...  # 2 CPU processes
    python recipes/compare.py --report                                     # only redraw table and plots

For each reference model (``recipes/reference.py``; trained first if not cached) and each FLOPs
reduction (30/50/70%), on the same data and the same 512 unlabeled calibration images (``--samples``):

- ``psp``: ``ptsp.prune`` with its defaults, no retraining;
- ``psp-4x``: the same from four times as many unlabeled calibration images (2048 by default):
  what a user with a few thousand images instead of a few hundred gets;
- ``tp`` / ``tp+bn``: Torch-Pruning's global magnitude pruning (``pip install -e '.[bench]'``), no
  retraining, then with BatchNorm statistics re-estimated on the calibration images; its channel
  ratio is bisected to meet the same FLOPs reduction;
- ``dhspg``: OTOv2 from scratch (``recipes/dhspg.py``'s recipe, as many epochs as the reference
  model), then compressed, at the same FLOPs reduction: ``target_flops=level`` with no tolerance
  (OTOv2 itself only targets a fraction of zero channel groups, which leaves the FLOPs to chance:
  at 1 − √(1 − level) of the groups it removed only 5–13% of the FLOPs, the cheap late channels);
- ``finetune``: the psp model trained ``--finetune-epochs`` more with the reference recipe at a
  tenth of its learning rate;
- ``scratch-e`` / ``scratch-b``: psp's architecture from random init, trained as long as the
  reference model / for the same compute (epochs × FLOPs ratio).

Columns: top-1 on the 10k test images, params, FLOPs, CPU latency (batch 32, median of 11 batches)
and wall time (pruning plus any training), with the machine that measured them (the CPU, and the
GPU where there is one: pruning and training run on it, latency stays on the CPU) and the training's
mixed precision (``accelerate launch --mixed_precision bf16``: about 1.4× faster on a CPU with
native bfloat16 for resnet10t). Rows are appended to
``recipes/results/compare.csv`` as they finish (rerunning resumes, and measures again the asked rows
made from a psp model that ran with other ptsp defaults than today's; the table shows each row's);
``compare.md`` and ``compare.png`` are redrawn from it. Training runs on every process; pruning,
Torch-Pruning and evaluation on the main one.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

import bench_latency
import dhspg
import reference
import scratch
import table
import training

import ptsp
from ptsp.counting import count

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"
FIELDS = ["model", "level", "method", "top1", "dense_top1", "params", "flops", "flops_dense",
          "latency_ms", "seconds", "psp_seconds", "epochs", "processes", "bn", "lr", "max_ratio", "cpu", "seed",
          "samples"]
METHODS = ("psp", "psp-4x", "tp", "tp+bn", "dhspg", "finetune", "scratch-e", "scratch-b")
TRAINED = ("dhspg", "finetune", "scratch-e", "scratch-b")
#: the rows made from the psp model: measured again when the ptsp defaults it ran with change
FROM_PSP = ("psp", "psp-4x", "finetune", "scratch-e", "scratch-b")
SETTINGS = ("bn", "lr", "max_ratio")
#: what rows made before the settings were recorded ran with
RECORDED_LATER = {"bn": "reestimate", "lr": "0.001", "max_ratio": "1.0"}


def latency_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Median CPU milliseconds of one batch (one thread per process is what a shared machine gives)."""
    return 1e3 * bench_latency.latency(copy.deepcopy(model).cpu(), x, warmup=3, runs=11)


def tp_prune(model: torch.nn.Module, example: torch.Tensor, level: float) -> torch.nn.Module:
    """Torch-Pruning, global L2 magnitude, classifier kept, channel ratio bisected so that FLOPs
    drop by ``level`` (to within 1%)."""
    import timm
    import torch_pruning as tp

    heads = {m.qkv: m.num_heads for m in model.modules()
             if isinstance(m, timm.models.vision_transformer.Attention)}
    dense_flops = count(model, example)[1]

    def pruned(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model)
        tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=ratio, global_pruning=True, num_heads=heads,
                             ignored_layers=[m.get_classifier()]).step()
        return m

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(20):
        mid = (lo + hi) / 2
        best = pruned(mid)
        drop = 1 - count(best, example)[1] / dense_flops
        if abs(drop - level) < 0.01:
            break
        lo, hi = (mid, hi) if drop < level else (lo, mid)
    return best


def reestimate_bn(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """BatchNorm running statistics recomputed on the calibration images (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


class Run:
    """One comparison run: the data, the calibration images, and the rows written so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.acc = training.accelerator()
        self.csv = args.results / "compare.csv"
        self.artifacts = args.cache / "compare"
        reference.use_cache(args.cache, args.results)  # a training here is recorded there
        self.data = training.fashion_mnist_data(args.sample)
        calib_x = self.data.train.tensors[0]
        self.calib = ptsp.data.calibration_loader(calib_x, args.samples, 64, seed=args.seed)
        self.calib_4x = (ptsp.data.calibration_loader(calib_x, 4 * args.samples, 64, seed=args.seed)
                         if "psp-4x" in args.methods else None)
        self.bench_x = self.data.test.tensors[0][:32]
        self.done = self._keep_rows()
        # what timed the rows: the CPU (latency, and seconds without a GPU) and any GPU (seconds)
        gpu = self.acc.device.type == "cuda"
        self.machine = table.cpu() + (f", {torch.cuda.get_device_name(self.acc.device)}" if gpu else "")

    def _keep_rows(self) -> set[tuple[str, str, str]]:
        """The (model, level, method) rows already measured; the asked rows made from a psp model
        that ran with other ptsp defaults than today's are dropped, to be measured again."""
        args, rows = self.args, table.rows(self.csv)
        asked = {(m, str(lv), method) for m in args.models for lv in args.levels for method in args.methods}
        stale = [r for r in rows if (r["model"], r["level"], r["method"]) in asked
                 and r["method"] in FROM_PSP and table.stale(r, SETTINGS, RECORDED_LATER)]
        if stale and self.acc.is_main_process:
            print(f"measuring {len(stale)} rows again, as the ptsp defaults changed", flush=True)
            table.rewrite(self.csv, FIELDS, [r for r in rows if r not in stale])
        return {(r["model"], r["level"], r["method"]) for r in rows if r not in stale}

    def record(self, row: dict) -> None:
        if self.acc.is_main_process:
            print(row, flush=True)
            table.append(self.csv, FIELDS, {**row, "processes": self.acc.num_processes,
                                            "seed": self.args.seed, "samples": self.args.samples})

    def measure(self, name: str, level: str, method: str, model: torch.nn.Module, seconds: float,
                dense: dict, epochs: float | str = "", settings: dict | None = None,
                precision: str = "", psp_seconds: float | None = None) -> None:
        """Evaluate and time ``model`` and record its row; ``precision``: accelerate's mixed
        precision of its training (``accelerate launch --mixed_precision``), if it trained;
        ``psp_seconds``: psp's wall time at this level on this machine, which the row's is read against."""
        model = model.cpu().eval()
        params, flops = count(model, self.bench_x[:1])
        self.record({"model": name, "level": level, "method": method,
                     "top1": f"{training.evaluate(model, self.data):.2f}", "dense_top1": dense["top1"],
                     "params": params, "flops": flops, "flops_dense": dense["flops"],
                     "latency_ms": f"{latency_ms(model, self.bench_x):.2f}", "seconds": f"{seconds:.1f}",
                     "psp_seconds": "" if psp_seconds is None else f"{psp_seconds:.1f}",
                     "epochs": epochs, **(settings or {}),
                     "cpu": self.machine + (f", {precision} training" if precision not in ("", "no") else "")})

    def model(self, name: str) -> None:
        args = self.args
        if not (reference.CACHE / f"{name}.safetensors").exists():
            reference.train(name, args.reference_epochs, 128, 2e-3, 0, self.data)
        base = reference.load(name)
        trained = reference.metadata(name)
        epochs = float(trained["epochs"])
        dense = {"top1": f"{training.evaluate(base, self.data):.2f}", "flops": count(base, self.bench_x[:1])[1]}
        if (name, "0", "dense") not in self.done:
            # a reference model made elsewhere (e.g. from the shipped artifact) has no training time
            self.measure(name, "0", "dense", base, float(trained.get("train_seconds", "nan")), dense, epochs,
                         precision=trained.get("mixed_precision", ""))
        for level in args.levels:
            self.level(name, base, str(level), epochs, dense)

    def psp(self, base: torch.nn.Module, calib, level: str) -> tuple[torch.nn.Module, float]:
        """``ptsp.prune`` with its defaults on a copy of ``base`` and its wall time in seconds."""
        t0 = time.perf_counter()
        pruned = ptsp.prune(copy.deepcopy(base).to(self.acc.device), calib, float(level), target="flops")
        return pruned, time.perf_counter() - t0

    def level(self, name: str, base: torch.nn.Module, level: str, epochs: float, dense: dict) -> None:
        acc, args = self.acc, self.args
        todo = [m for m in args.methods if (name, level, m) not in self.done]
        if not todo:
            return
        # the calibration draw is part of the model's name: runs of other seeds or sizes may share a cache
        psp_path = self.artifacts / f"{name}-{level}-psp-{args.samples}-seed{args.seed}.safetensors"
        # psp's wall time and the machine that took it: every row of this level is read against it,
        # so a cached psp model timed elsewhere (another CPU, other threads) is made again here
        timing = psp_path.with_suffix(".json")
        if acc.is_main_process:
            timed = json.loads(timing.read_text()) if timing.exists() else {}
            if ("psp" in todo or not psp_path.exists() or timed.get("cpu") != self.machine
                    or table.stale(table.settings(ptsp.plan_of(ptsp.load(psp_path))), SETTINGS, {})):
                pruned, seconds = self.psp(base, self.calib, level)
                self.artifacts.mkdir(parents=True, exist_ok=True)
                ptsp.save(pruned, psp_path, overwrite=True, model_args=reference.MODELS[name] or None)
                timed = {"seconds": seconds, "cpu": self.machine}
                timing.write_text(json.dumps(timed))
                if "psp" in todo:
                    self.measure(name, level, "psp", pruned, seconds, dense,
                                 settings=table.settings(ptsp.plan_of(pruned)), psp_seconds=seconds)
            psp_seconds = timed["seconds"]
            if "psp-4x" in todo:
                pruned, seconds = self.psp(base, self.calib_4x, level)
                self.measure(name, level, "psp-4x", pruned, seconds, dense,
                             settings=table.settings(ptsp.plan_of(pruned)), psp_seconds=psp_seconds)
            for method in ("tp", "tp+bn"):
                if method in todo:
                    self.torch_pruning(name, base, level, method, dense, psp_seconds)
        acc.wait_for_everyone()
        psp_seconds = json.loads(timing.read_text())["seconds"]
        plan = ptsp.plan_of(ptsp.load(psp_path))
        settings = table.settings(plan)
        ratio = plan["flops"]["before"] / plan["flops"]["after"]
        for method in (m for m in TRAINED if m in todo):
            torch.manual_seed(args.seed)
            if method == "dhspg":
                model = reference.create(name, self.data.mean, self.data.std)
                oto, stats = dhspg.train(acc, model, self.data, epochs=epochs * args.epochs_scale,
                                         target_flops=float(level), seed=args.seed)
                t0 = time.perf_counter()
                model = oto.compress() if acc.is_main_process else None
                seconds = stats["seconds"] + time.perf_counter() - t0
            else:
                model = ptsp.load(psp_path)
                run_epochs = {"finetune": args.finetune_epochs, "scratch-e": epochs,
                              "scratch-b": epochs * ratio}[method] * args.epochs_scale
                if method.startswith("scratch"):
                    scratch.reinitialise(model, args.seed)
                lr = 2e-4 if method == "finetune" else 2e-3
                stats = training.train(acc, model, self.data, epochs=run_epochs, lr=lr, seed=args.seed)
                model = acc.unwrap_model(model)
                seconds = stats["seconds"] + (psp_seconds if method == "finetune" else 0.0)
            if acc.is_main_process:
                self.measure(name, level, method, model, seconds, dense, stats["epochs"],
                             settings if method in FROM_PSP else None, self.acc.mixed_precision, psp_seconds)
            acc.wait_for_everyone()

    def torch_pruning(self, name: str, base: torch.nn.Module, level: str, method: str, dense: dict,
                      psp_seconds: float) -> None:
        if importlib.util.find_spec("torch_pruning") is None:
            print("torch-pruning missing (pip install -e '.[bench]'): no tp rows", file=sys.stderr)
            return
        t0 = time.perf_counter()
        model = tp_prune(base, self.bench_x[:1], float(level))
        if method == "tp+bn":
            model = reestimate_bn(model, ptsp.data.read_batches(self.calib))
        self.measure(name, level, method, model, time.perf_counter() - t0, dense, psp_seconds=psp_seconds)


def write_report(results: Path) -> None:
    rows = table.rows(results / "compare.csv")
    if not rows:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["# ptsp against the alternatives (Fashion-MNIST reference models)", "",
             f"Regenerate: {regenerate(rows, results)} (resumes from `compare.csv`; `--report` only redraws). "
             "Top-1 (%) on the 10k test images; psp and Torch-Pruning calibrate on the same "
             "unlabeled training images, psp-4x on four times as many. Latency: one batch of 32 images on the CPU, median "
             "of 11. Seconds: wall time of pruning plus any training (fine-tune includes psp's), on "
             "the machine of the cpu column (on its GPU where it names one). × psp: that time over psp's "
             "at the same level on the same machine (timed with the row; for rows made before that was "
             "recorded, psp's row where it ran on the same machine). bn, lr and max ratio: the ptsp defaults "
             "(`Reconstruction.bn`, `Reconstruction.lr`, `prune`'s max_ratio) that the psp model "
             "behind the row ran with (fine-tune starts from it, Scratch-E/B take its architecture). cpu: "
             "the machine and torch threads per process that measured the row's latency and seconds "
             "(rows made before the machine was recorded: –; before the threads were: one), and "
             "\"bf16 training\" where accelerate's mixed precision trained the model "
             "(`accelerate launch --mixed_precision bf16`); compare "
             "those columns only between rows of one machine and thread count.", ""]
    header = ("| model | FLOPs | method | top-1 | Δ dense | params | FLOPs kept | latency ms | epochs "
              "| seconds | × psp | bn | lr | max ratio | cpu |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        for level in sorted({r["level"] for r in mine}, key=float):
            cell = {r["method"]: r for r in mine if r["level"] == level}
            for method in ("dense",) + METHODS:
                if method not in cell:
                    continue
                r = cell[method]
                top1, base = float(r["top1"]), float(r["dense_top1"])
                kept = int(r["flops"]) / int(r["flops_dense"])
                seconds = float(r["seconds"])
                times = _times(r, cell.get("psp"))
                settings = " | ".join((r.get(f) or RECORDED_LATER[f]) if method in FROM_PSP else ""
                                      for f in SETTINGS)
                lines.append(f"| {name} | {'dense' if level == '0' else f'−{float(level):.0%}'} | "
                             f"{method} | {top1:.2f} | {top1 - base:+.2f} | {int(r['params']) / 1e6:.2f}M | "
                             f"{kept:.0%} | {r['latency_ms']} | {r['epochs']} | {'–' if math.isnan(seconds) else f'{seconds:.0f}'} | "
                             f"{'' if math.isnan(times) else f'{times:.1f}×'} | {settings} | {r.get('cpu') or '–'} |")
    lines += ["", *checks(rows), "", "![top-1 against FLOPs and wall time](compare.png)"]
    (results / "compare.md").write_text("\n".join(lines) + "\n")
    _plot(rows, models, results / "compare.png")


def regenerate(rows: list[dict], results: Path) -> str:
    """The command that makes ``rows`` again from nothing (training the reference models that are
    not cached), read off the rows themselves, as a table grows over several runs of other options:
    every option whose value differs from its default, and a note where rows disagree on one. The
    quick-look options (``--sample``, ``--epochs-scale``) are not recorded: their tables are not kept."""
    ap, opts, mixed = parser(), [], []
    models = list(dict.fromkeys(r["model"] for r in rows))
    levels = sorted({r["level"] for r in rows if r["level"] != "0"}, key=float)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    if models != ap.get_default("models"):
        opts += ["--models", *models]
    if [float(lv) for lv in levels] != ap.get_default("levels"):
        opts += ["--levels", *levels]
    if methods != ap.get_default("methods"):
        opts += ["--methods", *methods]
    # rows written before a value was recorded ran with the default
    for option, method, field in (("--reference-epochs", "dense", "epochs"), ("--finetune-epochs", "finetune", "epochs"),
                                  ("--seed", None, "seed"), ("--samples", None, "samples")):
        default = ap.get_default(option[2:].replace("-", "_"))
        values = sorted({float(r.get(field) or default) for r in rows if method in (None, r["method"])})
        if len(values) > 1:
            mixed.append(f"{option} " + " / ".join(f"{v:g}" for v in values))
        elif values and values[0] != default:
            opts += [option, f"{values[0]:g}"]
    if results.resolve() != RESULTS:
        opts += ["--results", os.path.relpath(results.resolve(), RESULTS.parents[1])]
    launch = "accelerate launch"
    processes = {r.get("processes") or "1" for r in rows}
    if len(processes) == 1 and processes != {"1"}:
        launch += f" --num_processes {processes.pop()}"
    # accelerate gives a CPU process one thread unless told: the rows' times depend on it
    threads = {m.group(1) for r in rows if (m := re.search(r"(\d+) threads?\b", r.get("cpu") or ""))}
    if len(threads) == 1 and threads != {"1"}:
        launch += f" --num_cpu_threads_per_process {threads.pop()}"
    if any("bf16 training" in (r.get("cpu") or "") for r in rows):
        launch += " --mixed_precision bf16"
    note = f" (its rows ran with several values of {'; '.join(mixed)})" if mixed else ""
    cells = len(models) * (1 + len(levels) * len(methods))  # a dense row per model
    if len(rows) < cells:
        note += f" (which makes {cells} rows; the table holds {len(rows)} of them)"
    return f"`{launch} {' '.join(['recipes/compare.py', *opts])}`{note}"


def _one_machine(a: dict, b: dict) -> bool:
    """Whether two rows were timed on one machine: only then do their seconds compare (the rows of
    one table may come from several runs)."""
    return (a.get("cpu") or "").split(",")[0] == (b.get("cpu") or "").split(",")[0]


def _times(row: dict, of: dict | None) -> float:
    """``row``'s wall time over ``of``'s (psp's row where None), or nan where they were not timed on
    one machine. A row's ``psp_seconds`` is psp's time on the row's own machine: it stands in for
    psp's row, which an earlier run may have timed elsewhere."""
    if (of is None or of["method"] == "psp") and row.get("psp_seconds"):
        return float(row["seconds"]) / float(row["psp_seconds"])
    if of is None or not _one_machine(row, of):
        return math.nan
    return float(row["seconds"]) / float(of["seconds"])


def checks(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the table: psp (and psp-4x) within 0.5 points of fine-tuning
    and Scratch-B at −50% FLOPs (with the time ratio, and a note where one beats the dense reference, which
    bounds a method without retraining), and ahead of Torch-Pruning at every level."""
    out = ["## Targets, as measured", ""]
    cells: dict[tuple[str, str], dict] = {}
    dense_epochs = {r["model"]: r["epochs"] for r in rows if r["method"] == "dense"}
    for r in rows:
        cells.setdefault((r["model"], r["level"]), {})[r["method"]] = r
    for (name, level), cell in sorted(cells.items()):
        if "psp" not in cell or level == "0":
            continue
        psp = float(cell["psp"]["top1"])
        notes = []
        for other in ("finetune", "scratch-b"):
            if level == "0.5" and other in cell:
                for mine in (m for m in ("psp", "psp-4x") if m in cell):
                    gap = float(cell[other]["top1"]) - float(cell[mine]["top1"])
                    speed = _times(cell[other], cell[mine])
                    when = "timed on another machine" if math.isnan(speed) else f"at {speed:.1f}× {mine}'s wall time"
                    notes.append(f"{other} {gap:+.2f} points over {mine} "
                                 f"({'within' if gap <= 0.5 else 'NOT within'} 0.5) {when}")
                lead = float(cell[other]["top1"]) - float(cell[other]["dense_top1"])
                if lead > 0:  # psp's teacher is the bound of a method without retraining
                    notes.append(f"{other} beats the dense reference itself by {lead:+.2f} "
                                 f"({cell[other]['epochs']} epochs, the reference "
                                 f"{dense_epochs.get(name, '–')})")
        for other in ("tp", "tp+bn"):
            if other in cell:
                gap = psp - float(cell[other]["top1"])
                notes.append(f"psp {'ahead of' if gap > 0 else 'NOT ahead of'} {other} by {gap:+.2f}")
        if notes:
            out.append(f"- {name} −{float(level):.0%} FLOPs: " + "; ".join(notes) + ".")
    return out


def _plot(rows: list[dict], models: list[str], path: Path) -> None:
    plt = table.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 6.4), squeeze=False)
    for col, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name]
        for method in METHODS:
            pts = sorted((int(r["flops"]) / int(r["flops_dense"]), float(r["seconds"]), float(r["top1"]))
                         for r in mine if r["method"] == method)
            if pts:
                axes[0][col].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
                axes[1][col].scatter([p[1] for p in pts], [p[2] for p in pts], label=method)
        for ax in axes[:, col]:
            dense = [float(r["top1"]) for r in mine if r["method"] == "dense"]
            if dense:
                ax.axhline(dense[0], color="grey", ls="--", lw=1, label="dense")
            ax.set_ylabel("top-1 (%)")
        axes[0][col].set_title(name, fontsize=9)
        axes[0][col].set_xlabel("FLOPs kept")
        axes[1][col].set_xscale("log")
        axes[1][col].set_xlabel("wall time (s, pruning + training)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=reference.DEFAULT_MODELS, choices=list(reference.MODELS))
    ap.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="FLOPs reductions")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--samples", type=int, default=512, help="calibration images (psp-4x: four times as many)")
    ap.add_argument("--finetune-epochs", type=float, default=1)
    ap.add_argument("--reference-epochs", type=int, default=2, help="for reference models not yet trained")
    ap.add_argument("--epochs-scale", type=float, default=1.0,
                    help="scale every training length (a quick look at the trends)")
    ap.add_argument("--sample", action="store_true",
                    help="the 3000 + 1000 images committed in calib_data/ instead of 60k + 10k (quick checks)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the calibration draw and every training (a replicate of the whole run)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of compare.csv/.md/.png (and reference.json)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="folder of reference models and artifacts")
    ap.add_argument("--report", action="store_true", help="only redraw the table and plots")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not args.report:
        run = Run(args)
        for name in args.models:
            run.model(name)
        if not run.acc.is_main_process:
            return
    write_report(args.results)


if __name__ == "__main__":
    main()
