"""Speed of the psp pipeline against the compute floor: the same forward and backward passes with
no hooks, loss bookkeeping, planning or surgery.

The floor replays, on the same model and data, what the pipeline must compute: phase 1 (teacher
forward, student forward and backward, Adam step) on the dense model, phase 2 the same on the
pruned model (both under the pipeline's bfloat16 autocast where it applies, with BatchNorm in the
mode the pipeline's ``Reconstruction.bn`` runs it in: train mode, computing each batch's statistics,
by default; the teacher forward in the first pass only where the phase kept the teacher's
activations), the two BatchNorm re-estimation forwards, and the passes of the default
``importance="auto"``: a Taylor forward and backward (again after phase 1 when it picks taylor),
the original's forward and, per candidate plan, a BatchNorm re-estimation and an evaluation
forward.
The ratio is pipeline / floor (target ≤ 1.3). Writes ``recipes/results/bench_prune.md``.

    python recipes/bench_prune.py --model resnet18 --size 224 --samples 256
    python recipes/bench_prune.py --model resnet50 --samples 2048 --device cuda --runs 1
    python recipes/bench_prune.py --model resnet50 --samples 256 --device cuda --phase1-passes 2 \
        --phase2-passes 1 --profile      # where the time goes: the ops with the most self time

``--profile`` runs the pipeline once under ``torch.profiler`` instead and writes its 25 ops with
the most self time (on the GPU where it runs there) to ``recipes/results/bench_prune_profile.md``.

``--ops`` counts the tensor operations (views apart) of one pipeline run and of its floor instead,
in total and per kind, into ``recipes/results/bench_prune_ops.md``. On a GPU each is a kernel
launch with a fixed cost, so when the activations are small the count, not the arithmetic, sets
the pace; it is measured on any machine (on a CPU the loss runs per layer, where an
accelerator defers most of it to all layers at once):

    python recipes/bench_prune.py --model resnet50 --size 32 --samples 64 --batch 4 \
        --phase1-passes 4 --phase2-passes 4 --ops
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import subprocess
import time
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptsp
import table
from ptsp.reconstruction import autocast

RESULTS = Path(__file__).resolve().parent / "results"


def floor_seconds(model: torch.nn.Module, pruned: torch.nn.Module, batches: list[torch.Tensor],
                  settings: ptsp.Reconstruction) -> float:
    """Wall time of the bare passes the pipeline needs, on the model's device (the batches copied
    there one at a time, as the pipeline does)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    def passes(student: torch.nn.Module, teacher: torch.nn.Module, phase: str) -> None:
        optimiser = torch.optim.Adam(student.parameters(), settings.lr)
        for m in (*student.modules(), *teacher.modules()):  # as the reconstruction runs them
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train(settings.bn.startswith("train"))
        cached = report[phase].get("teacher_cached", False)
        for j in range(report[phase]["passes"]):
            for x in batches:
                x = x.to(device, non_blocking=True)
                with autocast(device, settings.amp):
                    if j == 0 or not cached:
                        with torch.no_grad():
                            teacher(x)
                    out = student(x)
                optimiser.zero_grad()
                out.float().pow(2).mean().backward()
                optimiser.step()

    teacher = copy.deepcopy(model).eval()
    report = ptsp.plan_of(pruned)["report"]
    auto = report.get("importance", {})
    t0 = time.perf_counter()
    if auto:
        work = copy.deepcopy(model).eval()
        for _ in range(1 + (ptsp.plan_of(pruned)["importance"] == "taylor")):
            for x in batches:
                work(x.to(device, non_blocking=True)).float().pow(2).mean().backward()
        with torch.no_grad():
            for _ in range(1 + 2 * len(auto)):
                for x in batches:
                    teacher(x.to(device, non_blocking=True))
    passes(copy.deepcopy(model).eval(), teacher, "phase1")
    passes(copy.deepcopy(pruned).eval(), teacher, "phase2")
    teacher.eval()
    with torch.no_grad():
        for _ in range(2):
            for x in batches:
                pruned.train()(x.to(device, non_blocking=True))
    pruned.eval()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> str:
    """What timed a run: the GPU (and torch) where it ran on one, else the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return table.cpu()


def profile(model: torch.nn.Module, calib: list[torch.Tensor], args: argparse.Namespace,
            settings: ptsp.Reconstruction) -> None:
    """One pipeline run under ``torch.profiler``: the ops with the most self time, on the device."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        ptsp.prune(model, calib, args.ratio, target="flops", reconstruction=settings)
        _sync(device)
    seconds = time.perf_counter() - t0
    ops = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=25)
    cmd = _command(args, "--profile")
    text = (f"# Where the psp pipeline's time goes\n\n`{cmd}` ({time.strftime('%Y-%m-%d')}, {_machine(device)}; "
            f"{seconds:.1f} s under the profiler)\n\n```\n{ops}\n```\n")
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_prune_profile.md").write_text(text)


class _Count(TorchDispatchMode):
    """Counts the operations dispatched inside it, by name; views launch nothing and are left out."""

    VIEWS = {"detach", "view", "_unsafe_view", "split", "slice", "select", "expand", "as_strided",
             "t", "transpose", "permute", "unsqueeze", "squeeze", "alias", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: torch.nn.Module, calib: list[torch.Tensor], args: argparse.Namespace,
              settings: ptsp.Reconstruction) -> None:
    """Operations of one pipeline run against its floor's (see ``--ops`` above)."""
    device = next(model.parameters()).device
    with _Count() as pipeline:
        pruned = ptsp.prune(model, calib, args.ratio, target="flops", reconstruction=settings)
    with _Count() as floor:
        floor_seconds(model, pruned, ptsp.data.read_batches(calib), settings)
    total, bare = sum(pipeline.counts.values()), sum(floor.counts.values())
    extra = pipeline.counts - floor.counts
    cmd = _command(args, "--ops")
    rows = ["| model | device | input | samples | passes (1+2) | pipeline ops | floor ops | ratio |"
            " most frequent beyond the floor |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {args.model} | {device.type} | {args.size}×{args.size} | {args.samples} | "
            f"{args.phase1_passes}+{args.phase2_passes} | {total} | {bare} | {total / bare:.2f} | "
            + ", ".join(f"{name} {n}" for name, n in extra.most_common(8)) + " |"]
    print("\n".join(rows))
    out = RESULTS / "bench_prune_ops.md"
    text = out.read_text() if out.exists() else (
        "# Operations of the psp pipeline vs its floor\n\nEach is a kernel launch on a GPU (views "
        "apart), where small activations leave the launches, not the arithmetic, setting the pace. "
        "Counted on the machine named: a CPU computes the loss per layer, where a GPU defers "
        "most of it to all layers at once.\n")
    out.write_text(text + f"\n`{cmd}` ({time.strftime('%Y-%m-%d')}, commit {_commit()}, "
                   f"{_machine(device)})\n\n" + "\n".join(rows) + "\n")


def _command(args: argparse.Namespace, *flags: str) -> str:
    """The command line that measures the same thing again."""
    return " ".join(
        ["python recipes/bench_prune.py", f"--model {args.model} --size {args.size}",
         f"--samples {args.samples} --batch {args.batch}",
         f"--phase1-passes {args.phase1_passes} --phase2-passes {args.phase2_passes}"]
        + ([f"--device {args.device}"] if args.device != "cpu" else [])
        + ([f"--teacher-cache-gb {args.teacher_cache_gb:g}"] if args.teacher_cache_gb is not None else [])
        + list(flags))


def _commit() -> str:
    """The code counted: the checkout's commit, ``-dirty`` with changes on top."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--phase1-passes", type=int, default=20)
    parser.add_argument("--phase2-passes", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--teacher-cache-gb", type=float,
                        help="Reconstruction.teacher_cache_gb (default: its own; 0: no cache)")
    parser.add_argument("--profile", action="store_true", help="one profiled run instead (see above)")
    parser.add_argument("--ops", action="store_true", help="count operations instead (see above)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).eval().to(device)
    images = torch.randn(args.samples, 3, args.size, args.size)
    calib = ptsp.data.calibration_loader(images, args.samples, args.batch)
    batches = ptsp.data.read_batches(calib)
    settings = ptsp.Reconstruction(phase1_passes=args.phase1_passes,
                                   phase2_passes=args.phase2_passes,
                                   teacher_cache_gb=args.teacher_cache_gb, progress=False)
    if args.profile:
        return profile(model, calib, args, settings)
    if args.ops:
        return count_ops(model, calib, args, settings)
    rows = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        pruned = ptsp.prune(model, calib, args.ratio, target="flops", reconstruction=settings)
        _sync(device)
        pipeline = time.perf_counter() - t0
        stages = {k: round(v, 1) for k, v in ptsp.plan_of(pruned)["seconds"].items()}
        print(f"pipeline {pipeline:.1f} s: {stages}", flush=True)
        floor = floor_seconds(model, pruned, batches, settings)
        rows.append((pipeline, floor))
        print(f"pipeline {pipeline:.1f} s, floor {floor:.1f} s, ratio {pipeline / floor:.2f}", flush=True)
    pipe = statistics.median(r[0] for r in rows)
    floor = statistics.median(r[1] for r in rows)
    ratio = statistics.median(r[0] / r[1] for r in rows)
    cmd = _command(args, f"--runs {args.runs}")
    rows_md = ["| model | device | input | samples | passes (1+2) | pipeline s | floor s | ratio |",
               "|---|---|---|---|---|---|---|---|",
               f"| {args.model} | {device.type} | {args.size}×{args.size} | {args.samples} | {args.phase1_passes}+{args.phase2_passes} "
               f"| {pipe:.1f} | {floor:.1f} | {ratio:.2f} |"]
    print("\n".join(rows_md))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_prune.md"
    text = out.read_text() if out.exists() else "# psp pipeline vs the compute floor (medians)\n"
    out.write_text(text + f"\n`{cmd}` ({time.strftime('%Y-%m-%d')}, {args.runs} runs, commit {_commit()}, "
                   f"{_machine(device)})\n\n"
                   + "\n".join(rows_md) + "\n")


if __name__ == "__main__":
    main()
