"""Benchmark: time to build the dependency groups, ptsp vs Torch-Pruning's DependencyGraph.

    python recipes/bench_groups.py                     # resnet50 at 224x224 and 96x96, 7 runs each

Reports the median over runs (this machine is shared and noisy) and writes
recipes/results/bench_groups.md. Torch-Pruning is optional (pip install -e ".[bench]").
"""
from __future__ import annotations

import argparse
import statistics
from importlib.metadata import version
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ptsp  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "bench_groups.md"


def median_time(fn, runs: int) -> float:
    fn()  # warm-up (first export compiles and caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50"])
    ap.add_argument("--sizes", nargs="*", type=int, default=[224, 96])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    warnings.simplefilter("ignore")
    rows = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        for size in args.sizes:
            x = torch.randn(1, 3, size, size)
            ours = median_time(lambda: ptsp.build_groups(model, x), args.runs)
            theirs = None
            if tp is not None:
                theirs = median_time(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x), args.runs)
            rows.append((name, f"{size}x{size}", ours, theirs))
    threads = torch.get_num_threads()
    lines = ["# Group-building time", "",
             f"Regenerate: `python recipes/bench_groups.py {' '.join(sys.argv[1:])}`".rstrip("` ") + "`", "",
             f"Median of {args.runs} runs after one warm-up, batch 1, CPU, torch {torch.__version__}, "
             f"{threads} threads. Torch-Pruning: "
             + (f"{version('torch-pruning')}, DependencyGraph().build_dependency" if tp else "not installed") + ".", "",
             "| model | input | ptsp build_groups (s) | Torch-Pruning (s) | ratio |", "|---|---|---|---|---|"]
    for name, size, ours, theirs in rows:
        ratio = f"{ours / theirs:.1f}x" if theirs else "n/a"
        lines.append(f"| {name} | {size} | {ours:.3f} | {theirs:.3f} | {ratio} |" if theirs
                     else f"| {name} | {size} | {ours:.3f} | n/a | n/a |")
    lines += ["", "Most of ptsp's time is tracing to a pre-dispatch ATen graph with shapes on every node "
              "(make_fx, as torch.export does); Torch-Pruning walks the autograd nodes of one forward "
              "pass and records no shapes. Target: under 1 s for resnet50 at 224x224."]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
