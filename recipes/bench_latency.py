"""Real speed-up of a pruned model: dense vs pruned latency, CPU (and CUDA when present).

    python recipes/bench_latency.py                              # resnet50, 50% fewer FLOPs, batch 32
    python recipes/bench_latency.py --model convnext_tiny --round-to 8 --runs 15

Latency depends only on the pruned widths, so the plan is made data-free (``method="magnitude"``,
random weights: no download); a calibrated method gives the same FLOPs with other widths. Each
model runs ``--warmup`` batches, then ``--runs`` timed batches; the table shows the medians. Appends
a table to ``recipes/results/latency.md``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

import ptsp
import table

RESULTS = Path(__file__).resolve().parent / "results"


def latency(model: torch.nn.Module, x: torch.Tensor, warmup: int, runs: int) -> float:
    """Median seconds of one forward pass on ``x``."""
    model.eval()
    cuda = x.is_cuda
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of FLOPs removed")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    example = x[:1]
    pruned = {r: ptsp.prune(dense, None, args.ratio, method="magnitude", target="flops",
                            round_to=r, example_inputs=example) for r in args.round_to}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        xd = x.to(device)
        base = latency(dense.to(device), xd, args.warmup, args.runs)
        rows.append((device, "dense", "1", f"{base * 1e3:.1f}", "1.00×"))
        for r, model in pruned.items():
            t = latency(model.to(device), xd, args.warmup, args.runs)
            plan = ptsp.plan_of(model)
            kept = plan["flops"]["after"] / plan["flops"]["before"]
            rows.append((device, f"−{1 - kept:.1%} FLOPs", str(r), f"{t * 1e3:.1f}", f"**{base / t:.2f}×**"))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"Regenerate: `python recipes/bench_latency.py --model {args.model} --ratio {args.ratio} "
             f"--batch {args.batch} --round-to {' '.join(map(str, args.round_to))} --runs {args.runs}` "
             f"({time.strftime('%Y-%m-%d')}; torch {torch.__version__}, {table.cpu()}, {name}). "
             f"{args.model} at {args.size}×{args.size}, batch {args.batch}, median of {args.runs} "
             f"batches after {args.warmup} warm-up batches, eval mode, inference_mode.", "",
             "| device | model | round_to | ms / batch | speed-up |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "latency.md"  # one block per run and machine, appended
    text = out.read_text() if out.exists() else "# Latency: dense vs pruned\n"
    out.write_text(text + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
