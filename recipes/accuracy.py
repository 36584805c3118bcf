"""Accuracy of every pruning method on the reference models (Fashion-MNIST, no retraining).

Each cached reference model (``recipes/reference.py``) is pruned to 30%, 50% and 70% fewer FLOPs by
every method, calibrating on the same 512 unlabeled training images, and evaluated on the 10k test
images. Rows are appended to ``recipes/results/accuracy.csv`` as they finish (re-running resumes;
rows of a model since retrained, with another dense top-1, are dropped and measured again, and so
are the asked rows that ran with other defaults than today's);
the markdown table and the accuracy-vs-FLOPs plot are rewritten from the CSV.

    python recipes/reference.py && python recipes/accuracy.py
    python recipes/accuracy.py --models resnet18 --levels 0.5 --methods psp bn
    accelerate launch --mixed_precision bf16 recipes/accuracy.py --models resnet18 --levels 0.5 \
        --reference-epochs 8 --cache DIR --results recipes/results/trained   # longer-trained references

With ``--cache``, the reference models are read from (and, missing, trained with ``--reference-epochs``
into) ``DIR/reference`` instead of ``recipes/.cache/reference``, their training recorded in the results
folder's ``reference.json``: a study of other reference models beside the main table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import reference
import table

import ptsp

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["model", "method", "level", "top1", "dense_top1", "flops", "flops_dense", "params",
          "params_dense", "seconds", "importance", "bn", "lr", "max_ratio", "samples"]
METHODS = ("magnitude", "bn", "layerwise", "global", "psp")
#: the FLOPs reductions measured by default
LEVELS = [0.3, 0.5, 0.7]
#: the settings each method's result depends on (``prune``'s max_ratio, ``Reconstruction`` fields):
#: a row that ran with other values than today's defaults is measured again
SETTINGS = {"magnitude": ("max_ratio",), "bn": ("max_ratio", "bn"),
            **{m: ("max_ratio", "bn", "lr") for m in ("layerwise", "global", "psp")}}
#: what rows made before a setting was recorded ran with
RECORDED_LATER = {"lr": "0.001", "max_ratio": "1.0"}
COMMAND = "python recipes/reference.py && python recipes/accuracy.py"


def run(models: list[str], levels: list[float], methods: list[str], samples: int, results: Path,
        reference_epochs: int | None = None) -> None:
    csv = results / "accuracy.csv"
    results.mkdir(parents=True, exist_ok=True)
    for name in models:
        if reference_epochs and not (reference.CACHE / f"{name}.safetensors").exists():
            reference.train(name, reference_epochs, 128, 2e-3, 0)
        model = reference.load(name)
        test_x, test_labels, train_x = reference.prepared(model)
        calib = ptsp.data.calibration_loader(train_x, samples, 64, seed=0)
        dense = reference.evaluate(model, test_x, test_labels)
        dense_row = {"model": name, "method": "dense", "level": "0", "top1": f"{dense:.2f}"}
        done = _keep_rows_of(csv, name, dense_row["top1"], {(m, str(lv)) for m in methods for lv in levels},
                             samples)
        for level in levels:
            done -= _replanned(csv, model, calib, name, str(level), done)
            for method in methods:
                if (name, method, str(level)) in done:
                    continue
                t0 = time.perf_counter()
                pruned = ptsp.prune(model, None if method == "magnitude" else calib, level,
                                    method=method, target="flops")
                seconds = time.perf_counter() - t0
                plan = ptsp.plan_of(pruned)
                row = {"model": name, "method": method, "level": str(level),
                       "top1": f"{reference.evaluate(pruned, test_x, test_labels):.2f}",
                       "dense_top1": dense_row["top1"], "flops": plan["flops"]["after"],
                       "flops_dense": plan["flops"]["before"], "params": plan["params"]["after"],
                       "params_dense": plan["params"]["before"], "seconds": f"{seconds:.1f}",
                       "importance": plan["importance"], **table.settings(plan),
                       "samples": "" if method == "magnitude" else str(samples)}
                print(row, flush=True)
                table.append(csv, FIELDS, row)
        write_report(results)


def _keep_rows_of(csv: Path, name: str, dense: str, wanted: set[tuple[str, str]],
                  samples: int) -> set[tuple[str, str, str]]:
    """The (model, method, level) rows already measured. Rows of ``name`` measured on another
    reference model (another dense top-1: it was retrained) are dropped from the CSV, and so are
    the ``wanted`` (method, level) rows measured with other default settings or another number of
    calibration images (rows from before it was recorded: 512)."""
    rows = table.rows(csv)
    mine = [r for r in rows if r["model"] == name]
    retrained = [r for r in mine if r["dense_top1"] != dense]
    if retrained:
        print(f"{name}: dropping {len(retrained)} rows of an earlier reference model "
              f"(dense {retrained[0]['dense_top1']}, now {dense})", flush=True)
    changed = [r for r in mine if r not in retrained and (r["method"], r["level"]) in wanted
               and (table.stale(r, SETTINGS[r["method"]], RECORDED_LATER)
                    or r["method"] != "magnitude" and (r.get("samples") or "512") != str(samples))]
    if changed:
        print(f"{name}: measuring {len(changed)} rows again: other default settings or calibration set size", flush=True)
    stale = retrained + changed
    if stale:
        table.rewrite(csv, FIELDS, [r for r in rows if r not in stale])
    return {(r["model"], r["method"], r["level"]) for r in rows if r not in stale}


def _replanned(csv: Path, model: torch.nn.Module, calib, name: str, level: str,
               done: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """The measured rows of the calibrated methods at ``level`` whose plan is not the one
    ``importance="auto"`` chooses today (its measure changed since), dropped from the CSV: a row
    planned as today's would give the same top-1 again, so only these are measured again."""
    mine = [r for r in table.rows(csv) if r["model"] == name and r["level"] == level
            and r["method"] in ptsp.pruning.DATA_METHODS and (name, r["method"], level) in done]
    if not mine:
        return set()
    choice = ptsp.plan_of(ptsp.prune(model, calib, float(level), method="bn", target="flops",
                                     reconstruction=ptsp.Reconstruction(progress=False)))["importance"]
    stale = [r for r in mine if r["importance"] != choice]
    if stale:
        print(f"{name} at -{float(level):.0%}: measuring {len(stale)} rows again: auto now plans with {choice}",
              flush=True)
        table.rewrite(csv, FIELDS, [r for r in table.rows(csv) if r not in stale])
    return {(name, r["method"], level) for r in stale}


def write_report(results: Path = RESULTS) -> None:
    rows = table.rows(results / "accuracy.csv")
    if not rows:
        return
    # rows written before the calibration set size was recorded used the default, 512
    sizes = {r.get("samples") or "512" for r in rows if r["method"] != "magnitude"}
    samples = " or ".join(sorted(sizes))
    models = list(dict.fromkeys(r["model"] for r in rows))
    levels = sorted({r["level"] for r in rows}, key=float)
    meta = _trainings(results, models)
    command = COMMAND if results.resolve() == RESULTS else _study_command(results, meta, rows, levels, sizes)
    lines = ["# Accuracy without retraining (Fashion-MNIST reference models)", "",
             f"Regenerate: `{command}` (CPU). Top-1 (%) on the 10k test images after pruning to the "
             f"given FLOPs reduction; every calibrated method uses the same {samples} unlabeled "
             "training images and default settings. Δ is psp minus the dense model; plan is the criterion that "
             "the default `importance=\"auto\"` chose for the calibrated methods (magnitude always "
             "plans with l2); bn and lr are the `Reconstruction` defaults the psp row ran with (a relative lr is a "
             "fraction of each tensor's RMS), max "
             "ratio `prune`'s (a run measures the rows it asks for again when a default they depend "
             "on changes; the other rows keep the settings they ran with); params kept is psp's.", ""]
    trained = []
    for name, m in meta.items():
        if m.get("epochs"):
            precision = m.get("mixed_precision", "no")
            trained.append(f"{name}: {m['epochs']} epoch(s)"
                           + (f" ({precision} mixed precision)" if precision != "no" else ""))
    if trained:
        lines += ["Reference training (`recipes/reference.py --epochs N`): " + ", ".join(trained)
                  + ". Seconds are wall time on a shared 2-core CPU, not always the same one: "
                  "compare them within a model, not across.", ""]
    header = ("| model | dense | level | " + " | ".join(METHODS)
              + " | psp Δ | plan | bn | lr | max ratio | params kept | psp seconds |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name in models:
        for level in levels:
            cell = {r["method"]: r for r in rows if r["model"] == name and r["level"] == level}
            if not cell:
                continue
            any_row = next(iter(cell.values()))
            dense = float(any_row["dense_top1"])
            tops = {m: float(cell[m]["top1"]) for m in METHODS if m in cell}
            best = max(tops.values())
            shown = [(f"**{tops[m]:.2f}**" if tops[m] == best else f"{tops[m]:.2f}") if m in tops else "–"
                     for m in METHODS]
            delta = f"{tops['psp'] - dense:+.2f}" if "psp" in tops else "–"
            psp = cell.get("psp", {})
            kept = f"{int(psp['params']) / int(psp['params_dense']):.0%}" if psp else "–"
            secs, plan = psp.get("seconds", "–"), psp.get("importance") or "–"
            bn = psp.get("bn") or "–"
            lr, cap = ((psp.get(f) or RECORDED_LATER[f]) if psp else "–" for f in ("lr", "max_ratio"))
            lines.append(f"| {name} | {dense:.2f} | −{float(level):.0%} FLOPs | " + " | ".join(shown)
                         + f" | {delta} | {plan} | {bn} | {lr} | {cap} | {kept} | {secs} |")
    (results / "accuracy.md").write_text("\n".join(lines) + "\n\n![accuracy vs FLOPs](accuracy.png)\n")
    _plot(rows, models, results / "accuracy.png")


def _trainings(results: Path, models: list[str]) -> dict[str, dict[str, str]]:
    """How each model's reference was trained, from the results folder's own record first: the
    cache may hold another reference by now (or another study's)."""
    record = results / "reference.json"
    recorded = json.loads(record.read_text()) if record.exists() else {}
    return {name: recorded.get(name) or reference.metadata(name) for name in models}


def _study_command(results: Path, meta: dict[str, dict[str, str]], rows: list[dict],
                   levels: list[str], sizes: set[str]) -> str:
    """The commands that regenerate a study folder: one per reference training (epochs and
    precision), as its models may have been trained differently, with the levels, methods and
    calibration size of its rows where they are not the defaults."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    extra = ((f" --levels {' '.join(levels)}" if [float(v) for v in levels] != LEVELS else "")
             + (f" --methods {' '.join(methods)}" if methods != list(METHODS) else "")
             + (f" --samples {next(iter(sizes))}" if len(sizes) == 1 and sizes != {"512"} else ""))
    runs: dict[tuple[str, str], list[str]] = {}
    for name, m in meta.items():
        runs.setdefault((m.get("epochs", "?"), m.get("mixed_precision", "no")), []).append(name)
    folder = os.path.relpath(results.resolve(), RESULTS.parents[1])
    return "` then `".join(
        (f"accelerate launch --mixed_precision {precision} " if precision != "no" else "python ")
        + f"recipes/accuracy.py --models {' '.join(names)} --reference-epochs {epochs} "
        f"--cache DIR --results {folder}{extra}"
        for (epochs, precision), names in runs.items())


def _plot(rows: list[dict], models: list[str], path: Path) -> None:
    plt = table.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.4), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        for method in METHODS:
            pts = sorted((int(r["flops"]) / int(r["flops_dense"]), float(r["top1"]))
                         for r in mine if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(float(mine[0]["dense_top1"]), color="grey", ls="--", lw=1, label="dense")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("top-1 (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=reference.DEFAULT_MODELS, choices=list(reference.MODELS))
    parser.add_argument("--levels", nargs="+", type=float, default=LEVELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plot")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of accuracy.csv/.md/.png (and, with --cache, reference.json)")
    parser.add_argument("--cache", type=Path, help="folder of the reference models (DIR/reference)")
    parser.add_argument("--reference-epochs", type=int,
                        help="train the reference models missing from the cache this many epochs")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.cache is not None:
        reference.use_cache(args.cache, args.results)
    if args.report:
        write_report(args.results)
    else:
        run(args.models, args.levels, args.methods, args.samples, args.results, args.reference_epochs)


if __name__ == "__main__":
    main()
