"""How long ``ptsp.load`` takes to rebuild a pruned artifact in a fresh process (no tracing).

    python recipes/bench_load.py                     # resnet50, 50% fewer FLOPs, 5 processes
    python recipes/bench_load.py --model convnext_tiny --runs 7

The artifact is made once (data-free pruning, so the timing does not depend on calibration).
Each run is a new Python process that imports ptsp, then timm (which ``ptsp.load`` needs for a
timm base, and which imports torchvision), then times ``ptsp.load(path)``: creating the base
model, replaying the plan, reading and checking the weights. The table shows both parts and their
sum, the cost of a first load in a fresh process. Writes ``recipes/results/load.md``.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import ptsp

RESULTS = Path(__file__).resolve().parent / "results"
PROBE = """
import time, sys
t0 = time.perf_counter()
import ptsp
t1 = time.perf_counter()
import timm
t2 = time.perf_counter()
ptsp.load(sys.argv[1])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    pruned = ptsp.prune(model, None, args.ratio, method="magnitude", target="flops")
    with tempfile.TemporaryDirectory() as tmp:
        path = ptsp.save(pruned, Path(tmp) / f"{args.model}.safetensors")
        size = path.stat().st_size / 1e6
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                                 text=True, check=True)
            runs.append(tuple(map(float, out.stdout.split())))
    med = [statistics.median(r[i] for r in runs) for i in range(3)]
    first = statistics.median(r[1] + r[2] for r in runs)
    table = ["| model | FLOPs removed | file MB | import ptsp s | import timm s | ptsp.load s | timm import + ptsp.load s | runs (load) |",
             "|---|---|---|---|---|---|---|---|",
             f"| {args.model} | {args.ratio:.0%} | {size:.1f} | {med[0]:.2f} | {med[1]:.2f} | **{med[2]:.2f}** | "
             f"**{first:.2f}** | " + ", ".join(f"{r[2]:.2f}" for r in runs) + " |"]
    text = "\n".join(["# ptsp.load time", "",
                      f"Regenerate: `python recipes/bench_load.py --model {args.model} --runs {args.runs}` "
                      f"({time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}, timm {timm.__version__}, "
                      f"{torch.get_num_threads()} threads). Each run is a fresh process; medians over "
                      f"{args.runs} runs. ptsp.load = create the timm base, replay the plan, read, check "
                      "and load the weights (no tracing); the last column adds the one-time timm import "
                      "that a first load in a fresh process pays.", ""]
                     + table) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
