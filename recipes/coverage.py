"""Coverage benchmark: build groups, prune 50% of channels and check the correctness criterion for
every timm model under a parameter limit (pretrained=False, small inputs where the model allows).

    python recipes/coverage.py                       # all timm models < 100M params (resumable)
    python recipes/coverage.py --models resnet18 vit_tiny_patch16_224 --out /tmp/cov

Each model runs in a worker process with a time limit; results are appended to
``recipes/results/coverage.csv`` as they come, so an interrupted run resumes where it stopped.
``coverage.md`` (summary + table) is rewritten from the CSV at the end.

Status per model: ``pass`` (the pruned model equals the reference of the correctness criterion:
relative max-abs difference <= 1e-4), ``corrupt`` (pruning ran but the criterion failed: a silent corruption),
``error`` (an exception, listed with its message), ``timeout``, ``skip`` (model cannot run here).
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["model", "status", "input", "params_m", "groups", "prunable_groups", "prunable_channels",
          "prunable_frac", "err", "norm_groups", "params_red", "flops_red",
          "build_s", "prune_s", "unknown_ops", "repaired", "error"]
EXACT_TOL = 1e-4
SMALL = 96


def candidates(limit_m: float) -> list[tuple[str, float]]:
    """All timm architectures with fewer than ``limit_m`` million parameters (counted on meta)."""
    import timm
    import torch

    out = []
    for name in timm.list_models():
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = timm.create_model(name, pretrained=False)
            n = sum(p.numel() for p in m.parameters()) / 1e6
        except Exception:
            continue
        if n < limit_m:
            out.append((name, round(n, 2)))
    return out


def cached_candidates(path: Path, limit_m: float) -> list[str]:
    """:func:`candidates`, cached in ``path`` for this timm version and limit (listing takes minutes)."""
    import timm

    header = f"# timm {timm.__version__}, models under {limit_m:g}M parameters"
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and lines[0] == header:
            return [line.split()[0] for line in lines[1:] if line.strip()]
    found = candidates(limit_m)
    path.write_text("\n".join([header] + [f"{n} {p}" for n, p in found]) + "\n")
    return [n for n, _ in found]


def create(name: str):
    """(model, input, creation arguments): a 96x96 input if the model runs on one (built with
    ``img_size=96`` when it takes that argument), else its default input size."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    small = torch.randn(2, cfg[0], SMALL, SMALL, generator=torch.Generator().manual_seed(0))
    if cfg[1] <= SMALL:
        return model, torch.randn(2, *cfg, generator=torch.Generator().manual_seed(0)), {}
    for kwargs in ({}, {"img_size": SMALL}):
        try:
            m = timm.create_model(name, pretrained=False, **kwargs).eval() if kwargs else model
            with torch.no_grad():
                m(small[:1])
            return m, small, kwargs
        except Exception:
            continue
    return model, torch.randn(2, *cfg, generator=torch.Generator().manual_seed(0)), {}


def run_one(name: str) -> dict:
    import torch

    from ptsp.counting import count
    from ptsp.groups import build_groups
    from ptsp.importance import normalised_scores
    from ptsp.selection import select
    from ptsp.pruning import remove_checked
    from ptsp.surgery import criterion_error

    torch.manual_seed(0)
    row: dict = {"model": name}
    try:
        model, x, _ = create(name)
    except Exception as exc:
        return {**row, "status": "skip", "error": f"create: {type(exc).__name__}: {exc}"[:300]}
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    row["input"] = "x".join(map(str, x.shape[1:]))
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = build_groups(model, x[:1])
        row["build_s"] = round(time.perf_counter() - t0, 3)
        total = sum(g.channels for g in groups)
        prunable = [g for g in groups if g.prunable]
        row.update(groups=len(groups), prunable_groups=len(prunable),
                   prunable_channels=sum(g.channels for g in prunable),
                   prunable_frac=round(sum(g.channels for g in prunable) / max(total, 1), 3),
                   unknown_ops=";".join(sorted(groups.unknown_ops)))
        if not prunable:
            return {**row, "status": "pass", "error": "no prunable channels"}
        scores = normalised_scores(groups, dict(model.named_parameters()))
        row["norm_groups"] = sum(g.norm_crossing for g in prunable)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            removed, _, pruned, _ = remove_checked(model, groups, x[:1], set(),
                                             lambda skip: select(groups, scores, 0.5, skip=skip))
        row["prune_s"] = round(time.perf_counter() - t0, 3)
        row["repaired"] = "; ".join(str(w.message) for w in caught if "module code" in str(w.message))[:300]
        p0, f0 = count(model, x[:1])
        p1, f1 = count(pruned, x[:1])
        row.update(params_red=round(1 - p1 / p0, 3), flops_red=round(1 - f1 / max(f0, 1), 3))
        row["err"] = err = criterion_error(model, groups, removed, x)
        row["status"] = "pass" if err <= EXACT_TOL else "corrupt"
    except Exception as exc:
        row["status"] = "error"
        row["error"] = error_text(exc)
    return row


def error_text(exc: BaseException) -> str:
    """An exception in one line: type, first line of its message, and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)[-1]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text} [{Path(tb.filename).name}:{tb.lineno}]"[:300]


def _worker(conn, job) -> None:
    import torch

    torch.set_num_threads(1)
    while True:
        name = conn.recv()
        if name is None:
            return
        conn.send(job(name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="model names (default: every timm model under --limit)")
    ap.add_argument("--limit", type=float, default=100.0, help="parameter limit in millions")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--rerun", action="store_true", help="ignore earlier results")
    ap.add_argument("--report", action="store_true", help="only rewrite coverage.md from the CSV")
    ap.add_argument("--redo", nargs="*", default=[], metavar="STATUS",
                    help="run again the models whose earlier status is one of these (e.g. error timeout)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "coverage.csv"
    names = args.models or cached_candidates(args.out / "models.txt", args.limit)
    done = {}
    if csv_path.exists() and not args.rerun:
        with open(csv_path) as f:
            done = {r["model"]: r for r in csv.DictReader(f) if r["status"] not in args.redo}
        if args.redo:  # rewrite the CSV without the rows being redone
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in FIELDS} for r in done.values())
    todo = [] if args.report else [n for n in names if n not in done]
    print(f"{len(names)} models, {len(done)} already done, {len(todo)} to run", flush=True)
    write_header = not csv_path.exists() or args.rerun
    with open(csv_path, "w" if args.rerun else "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if write_header:
            writer.writeheader()
        for row in run_pool(todo, args.workers, args.timeout):
            writer.writerow({k: row.get(k, "") for k in FIELDS})
            f.flush()
            done[row["model"]] = row
            print(f"{row['model']:45s} {row['status']:8s} {row.get('error', '') or ''}", flush=True)
    rows = [done[n] for n in names if n in done]
    summary = write_markdown(rows, len(names), args.out / "coverage.md")
    print(summary)


def run_pool(todo: list[str], workers: int, timeout: float, job=run_one):
    """Rows of ``job(name)`` for each name, computed in ``workers`` spawned processes, a process
    killed and replaced when one name takes over ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    queue = list(todo)
    slots: list = []

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, job), daemon=True)
        p.start()
        return [p, parent, None, 0.0]

    slots = [start() for _ in range(min(workers, len(queue)))]
    while queue or any(s[2] for s in slots):
        for s in slots:
            p, conn, name, since = s
            if name is None and queue:
                s[2], s[3] = queue.pop(0), time.time()
                conn.send(s[2])
            elif name is not None and conn.poll(0.05):
                try:
                    row = conn.recv()
                except EOFError:
                    row = {"model": name, "status": "error", "error": "worker died"}
                s[2] = None
                yield row
            elif name is not None and (time.time() - since > timeout or not p.is_alive()):
                p.kill()
                status = "timeout" if p.is_alive() or time.time() - since > timeout else "error"
                yield {"model": name, "status": status,
                       "error": f"over {timeout:.0f} s" if status == "timeout" else "worker crashed"}
                s[:] = start()
        time.sleep(0.02)
    for p, conn, *_ in slots:
        conn.send(None)
        p.join(5)


def table(rows: list[dict], fields: list[str]) -> list[str]:
    """The markdown lines of a table of ``rows`` over ``fields`` (a "|" in a value shown as "/")."""
    return (["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
            + ["| " + " | ".join(str(r.get(k, "")).replace("|", "/") for k in fields) + " |" for r in rows])


def reasons(rows: list[dict], key: str) -> list[str]:
    """A table of ``rows``' model, status and reason (their ``key``), as every report lists failures."""
    return table([{**r, "reason": r.get(key, "")} for r in rows], ["model", "status", "reason"])


def write_markdown(rows: list[dict], planned: int, path: Path) -> str:
    n = len(rows)
    by = {k: [r for r in rows if r["status"] == k] for k in ("pass", "corrupt", "error", "timeout", "skip")}
    tried = n - len(by["skip"])

    def f(x, default="") -> float:
        try:
            return float(x)
        except (TypeError, ValueError):
            return default

    passed = by["pass"]
    conv = [r for r in passed if f(r.get("flops_red"), None) is not None]
    big = [r for r in conv if f(r["flops_red"]) >= 0.6 and f(r["params_red"]) >= 0.6]
    build = sorted(f(r["build_s"]) for r in passed if f(r.get("build_s"), None) is not None)
    med = build[len(build) // 2] if build else float("nan")
    summary = (f"{n} of {planned} models run. {len(passed)}/{tried} models pass ({100 * len(passed) / max(tried, 1):.1f}%); "
               f"silent corruptions: {len(by['corrupt'])}; errors: {len(by['error'])}; "
               f"timeouts: {len(by['timeout'])}; skipped (cannot run here): {len(by['skip'])}. "
               f"{len(big)}/{len(conv)} pruned models lose >= 60% of params and FLOPs at 50% of "
               f"prunable channels; median group build {med:.2f} s.")
    lines = ["# ptsp coverage over timm", "",
             "Regenerate: `python recipes/coverage.py` (resumable: it runs the models not yet in "
             "coverage.csv; `--rerun` starts over, `--redo error timeout` retries failures, "
             "`--report` only rewrites this file). Each model: timm `pretrained=False`, 96x96 input "
             "where the model runs on it (built with `img_size=96` when it takes that argument), "
             "one worker process per model with a 300 s limit, 1 thread.", "",
             summary, "",
             "Columns: prunable_frac = prunable channels / all channels; err = relative max-abs "
             "difference to the reference of the correctness criterion (pass: <= 1e-4); "
             "norm_groups = pruned groups that cross a channel normalisation; reductions at 50% of "
             "prunable channels; repaired = groups left unpruned because module code assumes "
             "fixed widths.", ""]
    for title, key in (("Failures", ("corrupt", "error", "timeout")), ("Skipped", ("skip",))):
        bad = [r for r in rows if r["status"] in key]
        if bad:
            lines += [f"## {title}", ""] + reasons(bad, "error") + [""]
    lines += ["## All models", ""] + table(rows, FIELDS[:-1])
    path.write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
