"""How much of a gap between calibrated methods is the draw of the calibration images.

    python recipes/noise.py                                   # resnet18, 50% fewer FLOPs, seeds 0–2
    python recipes/noise.py --models resnet10t --seeds 0 1 2 3 4
    python recipes/noise.py --models resnet18 --cache DIR --results recipes/results/trained  # longer-trained

The accuracy table (``recipes/accuracy.py``) calibrates every method on one draw of 512 training
images; gaps of a few tenths of a point between methods may be that draw. Here each calibrated
method prunes the reference model once per calibration seed (512 unlabeled training images drawn
with it), and the report gives each method's top-1 per seed, mean and standard deviation, its
agreement with the dense model's test predictions (the function the reconstruction restores), and
psp's paired gap to each method (same seed, same images): a gap of one sign at every seed is the
method, not the draw. Rows are appended to ``noise.csv`` in the results folder (``recipes/results``
unless ``--results``; re-running resumes); ``noise.md`` is rewritten from it. With ``--cache`` the
reference models are read from ``DIR/reference`` (the longer-trained ones of ``recipes/accuracy.py
--cache DIR``), whose seed-0 rows are that table's rows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import reference
import table

import ptsp

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["model", "level", "method", "seed", "top1", "agree", "dense_top1", "seconds", "defaults"]
METHODS = ("bn", "layerwise", "global", "psp")
#: the defaults every row ran with (a row with others is another experiment: it keeps its own table)
DEFAULTS = table.defaults_line()


def run(models: list[str], level: float, seeds: list[int], methods: list[str], results: Path,
        command: str) -> None:
    csv = results / "noise.csv"
    done = {(r["model"], r["level"], r["method"], r["seed"], r["dense_top1"], r["defaults"])
            for r in table.rows(csv)}
    results.mkdir(parents=True, exist_ok=True)
    for name in models:
        model = reference.load(name)
        test_x, test_labels, train_x = reference.prepared(model)
        teacher = reference.predictions(model, test_x)
        dense = f"{reference.percent(teacher == test_labels):.2f}"
        for seed in seeds:
            calib = ptsp.data.calibration_loader(train_x, 512, 64, seed=seed)
            for method in methods:
                if (name, str(level), method, str(seed), dense, DEFAULTS) in done:
                    continue
                t0 = time.perf_counter()
                pruned = ptsp.prune(model, calib, level, method=method, target="flops",
                                    reconstruction=ptsp.Reconstruction(progress=False))
                seconds = time.perf_counter() - t0
                pred = reference.predictions(pruned, test_x)
                row = {"model": name, "level": str(level), "method": method, "seed": str(seed),
                       "top1": f"{reference.percent(pred == test_labels):.2f}",
                       "agree": f"{reference.percent(pred == teacher):.2f}", "dense_top1": dense, "seconds": f"{seconds:.0f}",
                       "defaults": DEFAULTS}
                print(row, flush=True)
                table.append(csv, FIELDS, row)
    write_report(results, command)


def write_report(results: Path, command: str) -> None:
    rows = table.rows(results / "noise.csv")
    lines = ["# Calibration-draw noise (Fashion-MNIST reference models)", "",
             f"Regenerate: `{command}` (CPU; `--models M --methods ...` for each table). Top-1 (%) on the 10k test images of each "
             "calibrated method, once per calibration seed (512 unlabeled training images drawn with "
             "it); agree: the share of test images on which the pruned model predicts what the dense "
             "model does (mean over seeds). psp − method: psp's paired gap at each seed (same "
             "images), then its mean; one sign at every seed means the gap is the method's, not the "
             "draw's. Each table is one reference model (dense top-1) and one set of ptsp defaults.", ""]
    experiments: dict[tuple, list[dict]] = {}
    for r in rows:
        experiments.setdefault((r["model"], r["level"], r["dense_top1"], r["defaults"]), []).append(r)
    for (name, level, dense, defaults), mine in experiments.items():
        seeds = sorted({r["seed"] for r in mine}, key=int)
        top1 = {(r["method"], r["seed"]): float(r["top1"]) for r in mine}
        agree = {(r["method"], r["seed"]): float(r["agree"]) for r in mine}
        lines += [f"## {name}, {float(level):.0%} fewer FLOPs (dense {dense})", "",
                  f"Defaults: `{defaults}`", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | std | agree | psp − method per seed | mean gap |",
                  "|---|" + "---|" * (len(seeds) + 5)]
        for method in [m for m in METHODS if any(r["method"] == m for r in mine)]:
            mine_seeds = [s for s in seeds if (method, s) in top1]
            values = [top1[method, s] for s in mine_seeds]
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            paired = [top1["psp", s] - top1[method, s] for s in mine_seeds
                      if ("psp", s) in top1 and method != "psp"]
            lines.append(
                f"| {method} | " + " | ".join(f"{top1[method, s]:.2f}" if (method, s) in top1 else "–"
                                              for s in seeds)
                + f" | {statistics.mean(values):.2f} | {std:.2f} | "
                f"{statistics.mean(agree[method, s] for s in mine_seeds):.2f} | "
                + (" ".join(f"{d:+.2f}" for d in paired) or "–") + " | "
                + (f"{statistics.mean(paired):+.2f}" if paired else "–") + " |")
        lines.append("")
    (results / "noise.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18"], choices=list(reference.MODELS))
    ap.add_argument("--level", type=float, default=0.5, help="fraction of FLOPs removed")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration draws")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of noise.csv/.md")
    ap.add_argument("--cache", type=Path, help="folder of the reference models (DIR/reference)")
    args = ap.parse_args()
    torch.manual_seed(0)
    command = "python recipes/noise.py"
    if args.cache is not None:
        reference.use_cache(args.cache)
        command += " --cache DIR"
    if args.results.resolve() != RESULTS:
        command += f" --results {os.path.relpath(args.results.resolve(), RESULTS.parents[1])}"
    run(args.models, args.level, args.seeds, args.methods, args.results, command)


if __name__ == "__main__":
    main()
