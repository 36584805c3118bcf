"""The ``ptsp`` command line.

    ptsp prune --model resnet50 --calib images/ --ratio 0.5      # two-phase reconstruction
    ptsp prune --model resnet50 --method magnitude --ratio 0.5   # data-free, prints a table
    ptsp groups --model vit_tiny_patch16_224                     # coupled channel groups
"""
from __future__ import annotations

import argparse
import sys
import time

EXAMPLES = """examples:
  ptsp prune --model resnet50 --pretrained --calib imagenet_train/ --num-samples 2048 --ratio 0.3
  ptsp prune --model resnet50 --method magnitude --ratio 0.5 --target flops
  ptsp prune --model mobilenetv3_large_100 --ratio 0.3 --round-to 8
  ptsp groups --model vit_tiny_patch16_224 --unprunable
"""


def _model(args: argparse.Namespace):
    import timm
    import torch

    torch.manual_seed(0)  # random-init models (no --pretrained) are the same on every run
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained)
    except RuntimeError as exc:
        raise SystemExit(f"ptsp: unknown timm model {args.model!r} ({exc})") from exc
    except Exception as exc:
        raise SystemExit(f"ptsp: cannot create {args.model!r}: {type(exc).__name__}: {exc}") from exc
    if args.input_size:  # preprocessing and the example input both follow --input-size
        chans = model.pretrained_cfg.get("input_size", (3, 224, 224))[0]
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (chans, args.input_size, args.input_size)}
    return model.eval()


def _inputs(model, size: int | None):
    import torch

    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    shape = (1, cfg[0], size or cfg[1], size or cfg[2])
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.2f}P"


def cmd_prune(args: argparse.Namespace) -> None:
    import ptsp
    from torch import nn

    model = _model(args)
    x = _inputs(model, args.input_size)
    calib = None
    if args.method != "magnitude":
        if args.calib is None:
            raise ValueError(f"--method {args.method} needs calibration images: pass --calib "
                             "(a folder or a datasets name), or use --method magnitude")
        calib = ptsp.data.calibration_loader(args.calib, args.num_samples, args.batch_size,
                                             model=model, seed=args.seed)
    t0 = time.perf_counter()
    pruned = ptsp.prune(model, calib, args.ratio, method=args.method, target=args.target,
                        example_inputs=x, round_to=args.round_to, max_ratio=args.max_ratio)
    seconds = time.perf_counter() - t0
    plan = ptsp.plan_of(pruned)
    source = "data-free" if calib is None else f"{plan['report']['samples']} calibration images"
    print(f"{args.model}: {args.ratio:.0%} fewer {args.target} (method {args.method}, {source}, "
          f"input {tuple(x.shape)}, {seconds:.1f} s)\n")
    rows = [("", "before", "after", "change")]
    for key in ("params", "flops"):
        b, a = plan[key]["before"], plan[key]["after"]
        rows.append((key, _human(b), _human(a), f"-{1 - a / b:.1%}"))
    ch = plan["channels"]
    rows.append(("prunable channels", str(ch["prunable"]), str(ch["prunable"] - ch["removed"]),
                 f"-{ch['removed'] / max(ch['prunable'], 1):.1%}"))
    _table(rows)
    after = dict(pruned.named_modules())
    widths = [("layer", "width before", "width after")]
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in after:
            b = m.weight.shape[0]
            a = after[name].weight.shape[0]
            if a != b:
                widths.append((name, str(b), str(a)))
    print(f"\nwidths of the {len(widths) - 1} conv/linear layers that changed:")
    _table(widths)


def cmd_groups(args: argparse.Namespace) -> None:
    import ptsp

    model = _model(args)
    groups = ptsp.build_groups(model, _inputs(model, args.input_size))
    print(repr(groups))
    for g in groups:
        if not args.unprunable or not g.prunable:
            print(g)


def _table(rows: list[tuple[str, ...]]) -> None:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  ".join("-" * x for x in w))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ptsp", description="Post-training structured pruning.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="resnet50", help="timm model name (default: resnet50)")
    common.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    common.add_argument("--input-size", type=int, help="square input side (default: the model's)")
    p = sub.add_parser("prune", parents=[common], help="prune a timm model and print before/after")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction to remove (default 0.5)")
    p.add_argument("--target", choices=["channels", "flops", "params"], default="flops")
    p.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    p.add_argument("--max-ratio", type=float, default=1.0, help="most one group may lose")
    p.add_argument("--method", choices=["psp", "global", "layerwise", "bn", "magnitude"],
                   default="psp", help="default psp; magnitude needs no calibration data")
    p.add_argument("--calib", help="calibration images: a folder or a datasets name")
    p.add_argument("--num-samples", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.set_defaults(fn=cmd_prune)
    g = sub.add_parser("groups", parents=[common], help="print a model's coupled channel groups")
    g.add_argument("--unprunable", action="store_true", help="only the groups that cannot be pruned")
    g.set_defaults(fn=cmd_groups)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"ptsp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
