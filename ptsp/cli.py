"""The ``ptsp`` command line.

    ptsp prune                                   # offline demo: shipped model, data and test set
    ptsp prune --model resnet50 --pretrained --calib imagenet_train/ --eval imagenet_val/
    ptsp eval pruned.safetensors --data imagenet_val/
    ptsp info pruned.safetensors
    ptsp groups --model vit_tiny_patch16_224
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

#: the shipped sample (parquet splits "train" and "test") and the small model trained on it
SHIPPED = Path(__file__).resolve().parent.parent / "calib_data"
DEMO_MODEL = SHIPPED / "resnet10t.safetensors"
DEMO_DATA = SHIPPED / "fashion_mnist"

EXAMPLES = """examples:
  ptsp prune                                    # offline demo on the shipped model and images
  ptsp prune --model resnet50 --pretrained --calib imagenet_train/ --num-samples 1024 \\
             --eval imagenet_val/ --ratio 0.3 --output resnet50-psp.safetensors
  ptsp prune --model resnet50 --checkpoint finetuned.pth --num-classes 100 --calib images/
  ptsp prune --model resnet50 --method magnitude --ratio 0.5   # data-free
  ptsp eval resnet50-psp.safetensors --data imagenet_val/
  ptsp info resnet50-psp.safetensors
  ptsp groups --model vit_tiny_patch16_224 --unprunable
"""


class CliError(Exception):
    """A user error reported as one line with a non-zero exit code."""


def _is_artifact(spec: str) -> bool:
    return spec.endswith(".safetensors") or os.path.isfile(spec)


def _model(args: argparse.Namespace):
    """A ptsp artifact (a path) or a timm model (a name), in eval mode."""
    import timm
    import torch

    import ptsp

    if _is_artifact(args.model):
        for flag in ("pretrained", "checkpoint", "num_classes", "in_chans"):
            if getattr(args, flag, None):
                raise CliError(f"--{flag.replace('_', '-')} applies to a timm name, not to the "
                               f"artifact {args.model}")
        if not os.path.isfile(args.model):
            raise CliError(f"{args.model} does not exist")
        model = ptsp.load(args.model)
    else:
        if not timm.is_model(args.model):
            raise CliError(f"unknown timm model {args.model!r} (see timm.list_models())")
        kwargs = {k: v for k in ("num_classes", "in_chans") if (v := getattr(args, k, None))}
        if getattr(args, "checkpoint", None):
            kwargs["checkpoint_path"] = args.checkpoint
        torch.manual_seed(0)  # random-init models (no weights) are the same on every run
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
        except Exception as exc:
            raise CliError(f"cannot create {args.model!r}: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    chans, side = getattr(args, "in_chans", None), getattr(args, "input_size", None)
    if chans or side:  # preprocessing and the example input follow them
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (
            chans or size[0], side or size[1], side or size[2])}
    return model.to(args.device).eval()


def _inputs(model, device: str = "cpu"):
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = (1, *cfg.get("input_size", (3, 224, 224)))
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def _top1(model, source: str, split: str, batch_size: int, num_samples: int | None,
          device: str, label: str) -> float:
    import torch
    from tqdm import tqdm

    import ptsp

    loader = ptsp.data.evaluation_loader(source, model, split=split, batch_size=batch_size,
                                         num_samples=num_samples)
    correct = total = 0
    with torch.no_grad():
        for x, y in tqdm(loader, desc=f"top-1 {label}", leave=False, file=sys.stderr):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.2f}P"


def _table(rows: list[tuple[str, ...]]) -> None:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  ".join("-" * x for x in w))


def cmd_prune(args: argparse.Namespace) -> None:
    import torch

    import ptsp

    demo = args.model is None
    if demo:
        args.model = str(DEMO_MODEL)
        args.calib = args.calib or str(DEMO_DATA)
        args.eval = args.eval or str(DEMO_DATA)
    name = Path(args.model).name.removesuffix(".safetensors")
    output = Path(args.output or f"{name}-pruned.safetensors")
    if output.exists() and not args.overwrite:
        raise CliError(f"{output} exists; pass --overwrite to replace it or --output elsewhere")
    if args.method == "magnitude" and args.augment != "none":
        raise CliError("--augment varies calibration batches: it applies to the calibrated methods, "
                       "not --method magnitude")
    if args.method == "magnitude" and args.passes is not None:
        raise CliError("--passes sets the reconstruction: it applies to the calibrated methods, "
                       "not --method magnitude")
    passes = {} if args.passes is None else dict(zip(("phase1_passes", "phase2_passes"), args.passes))
    settings = ptsp.Reconstruction(augment=args.augment, **passes)  # bad values fail before any work
    model = _model(args)
    x = _inputs(model, args.device)
    calib = None
    if args.method != "magnitude":
        if args.calib is None:
            raise CliError(f"--method {args.method} needs calibration images: pass --calib "
                           "(a folder or a datasets name), or use --method magnitude")
        calib = ptsp.data.calibration_loader(args.calib, args.num_samples, args.batch_size,
                                             model=model, seed=args.seed)
    evaluate = (lambda m, label: _top1(m, args.eval, args.eval_split, args.batch_size,
                                       args.eval_samples, args.device, label)) if args.eval else None
    dense_top1 = evaluate(model, "dense") if evaluate else None
    t0 = time.perf_counter()
    pruned = ptsp.prune(model, calib, args.ratio, method=args.method, target=args.target,
                        importance=args.importance, example_inputs=x, round_to=args.round_to,
                        max_ratio=args.max_ratio,
                        reconstruction=settings)
    seconds = time.perf_counter() - t0
    pruned_top1 = evaluate(pruned, "pruned") if evaluate else None
    ptsp.save(pruned, output, overwrite=args.overwrite)
    reloaded = ptsp.load(output, device=args.device)
    probe = next(iter(calib))[:8].to(args.device) if calib is not None else x
    with torch.no_grad():
        same = torch.equal(pruned(probe), reloaded(probe))
    if not same:
        raise CliError(f"{output} reloaded with different outputs: please report this bug")
    plan = ptsp.plan_of(pruned)
    source = "data-free" if calib is None else f"{plan['report']['samples']} calibration images"
    print(f"{name}: {args.ratio:.0%} fewer {args.target} (method {args.method}, {source}, "
          f"input {tuple(x.shape)}, {seconds:.1f} s)\n")
    rows = [("", "dense", "pruned", "change")]
    for key in ("params", "flops"):
        b, a = plan[key]["before"], plan[key]["after"]
        rows.append((key, _human(b), _human(a), f"-{1 - a / b:.1%}"))
    ch = plan["channels"]
    rows.append(("prunable channels", str(ch["prunable"]), str(ch["prunable"] - ch["removed"]),
                 f"-{ch['removed'] / max(ch['prunable'], 1):.1%}"))
    if evaluate:
        rows.append((f"top-1 % ({args.eval_split} of {Path(args.eval).name})", f"{dense_top1:.2f}",
                     f"{pruned_top1:.2f}", f"{pruned_top1 - dense_top1:+.2f}"))
    _table(rows)
    print(f"\nsaved {output} ({output.stat().st_size / 1e6:.1f} MB); reloaded: identical outputs")


def cmd_eval(args: argparse.Namespace) -> None:
    model = _model(args)
    top1 = _top1(model, args.data, args.split, args.batch_size, args.num_samples, args.device, "")
    print(f"{args.model}: top-1 {top1:.2f}% on the {args.split} split of {args.data}")


def cmd_info(args: argparse.Namespace) -> None:
    import json

    from torch import nn

    import ptsp
    from ptsp.counting import count
    from ptsp.io import BASE_ATTR

    if not os.path.isfile(args.file):
        raise CliError(f"{args.file} does not exist")
    model = ptsp.load(args.file)
    plan, base = ptsp.plan_of(model), getattr(model, BASE_ATTR)
    params, flops = count(model, _inputs(model))
    args_text = ", ".join(f"{k}={v}" for k, v in base.get("args", {}).items())
    print(f"{args.file}: {base.get('timm') or base.get('class')}({args_text})")
    print(f"  written by ptsp {plan.get('ptsp_version')}; method {plan.get('method') or 'none (dense)'}")
    if plan.get("method"):
        if "ratio" in plan:
            print(f"  {plan['ratio']:.0%} fewer {plan['target']}, importance {plan['importance']}, "
                  f"round_to {plan['round_to']}, max_ratio {plan['max_ratio']}")
        for key in ("reconstruction", "dhspg"):
            if plan.get(key):
                print(f"  {key}: " + json.dumps(plan[key]))
        print(f"  params {_human(plan['params']['before'])} → {_human(plan['params']['after'])}, "
              f"FLOPs {_human(plan['flops']['before'])} → {_human(plan['flops']['after'])}")
        report = plan.get("report") or {}
        if "group_sparsity" in report:
            print(f"  group sparsity {report['group_sparsity']:.3f} of {report['groups']} groups")
        for phase in ("phase1", "phase2"):
            losses = (report.get(phase) or {}).get("loss")
            if losses:
                print(f"  {phase} reconstruction loss per pass: {losses[0]:.4g} → {losses[-1]:.4g} "
                      f"({len(losses)} passes over {report[phase]['layers']} layers)")
        if "samples" in report:
            print(f"  calibration images: {report['samples']}")
        seconds = plan.get("seconds") or {}
        if seconds:
            print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"  now: {_human(params)} params, {_human(flops)} FLOPs at input "
          f"{tuple(_inputs(model).shape[1:])}\n")
    original = _base_widths(base)
    rows = [("layer", "type", "width", "of", "params")]
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            width = m.weight.shape[0]
            rows.append((name, type(m).__name__, str(width), str(original.get(name, "?")),
                         _human(sum(p.numel() for p in m.parameters(recurse=False)))))
    _table(rows)


def _base_widths(base: dict) -> dict[str, int]:
    """Output widths of the unpruned timm base (built on the meta device: no memory, no init)."""
    if not base.get("timm"):
        return {}
    import timm
    import torch

    from ptsp.io import as_tuples

    with torch.device("meta"):
        full = timm.create_model(base["timm"], **{k: as_tuples(v) for k, v in base["args"].items()})
    return {n: m.weight.shape[0] for n, m in full.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() > 1}


def cmd_groups(args: argparse.Namespace) -> None:
    import ptsp

    model = _model(args)
    groups = ptsp.build_groups(model, _inputs(model, args.device))
    print(repr(groups))
    for g in groups:
        if not args.unprunable or not g.prunable:
            print(g)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptsp", description="Post-training structured pruning.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu", help="where to run (default cpu; e.g. cuda)")
    timm_args = argparse.ArgumentParser(add_help=False, parents=[device])
    timm_args.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    timm_args.add_argument("--checkpoint", help="weights file for the timm model (timm's checkpoint_path)")
    timm_args.add_argument("--num-classes", type=int, help="classifier width of the checkpoint")
    timm_args.add_argument("--in-chans", type=int, help="input channels of the checkpoint")
    timm_args.add_argument("--input-size", type=int, help="square input side (default: the model's)")

    p = sub.add_parser("prune", parents=[timm_args], help="prune a model, evaluate, save and reload it",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="timm name or ptsp artifact (default: the shipped demo model, "
                   "calibrated and evaluated on the shipped Fashion-MNIST sample)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction to remove (default 0.5)")
    p.add_argument("--target", choices=["channels", "flops", "params"], default="flops")
    p.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    p.add_argument("--max-ratio", type=float, default=0.9, help="most one group may lose")
    p.add_argument("--method", choices=["psp", "global", "layerwise", "bn", "magnitude"],
                   default="psp", help="default psp; magnitude needs no calibration data")
    p.add_argument("--importance", help="channel criterion: auto, l2, l1, bn_scale, taylor or random "
                   "(default: auto for the calibrated methods, l2 for magnitude)")
    p.add_argument("--augment", choices=["none", "flip", "shift", "mixup", "cutmix"],
                   default="none", help="vary each calibration batch (ptsp.Reconstruction's augment; default none): "
                   "cutmix with --passes 60 30 keeps the most of a densenet")
    p.add_argument("--passes", type=int, nargs=2, metavar=("PHASE1", "PHASE2"),
                   help="passes over the calibration images in phase 1 and phase 2 (default 20 10; "
                   "ptsp.Reconstruction's phase1_passes and phase2_passes)")
    p.add_argument("--calib", help="calibration images: a folder (images or parquet) or a datasets name")
    p.add_argument("--num-samples", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--eval", help="labelled images to report dense and pruned top-1 on")
    p.add_argument("--eval-split", default="test", help="split of --eval (default test)")
    p.add_argument("--eval-samples", type=int, help="evaluate on a seeded sample of this many")
    p.add_argument("--output", help="artifact path (default ./<model>-pruned.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(fn=cmd_prune)

    e = sub.add_parser("eval", parents=[timm_args], help="top-1 of a model on labelled images")
    e.add_argument("model", help="ptsp artifact or timm name")
    e.add_argument("--data", required=True, help="a folder (class subfolders or parquet) or datasets name")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--num-samples", type=int, help="a seeded sample of this many (default: all)")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("info", help="an artifact's base model, settings, metrics and layer widths")
    i.add_argument("file", help="ptsp artifact (.safetensors)")
    i.set_defaults(fn=cmd_info)

    g = sub.add_parser("groups", parents=[timm_args], help="print a model's coupled channel groups")
    g.add_argument("--model", default="resnet50", help="timm name or ptsp artifact (default resnet50)")
    g.add_argument("--unprunable", action="store_true", help="only the groups that cannot be pruned")
    g.set_defaults(fn=cmd_groups)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.fn(args)
    except (CliError, ValueError, TypeError, RuntimeError, FileExistsError, FileNotFoundError) as exc:
        print(f"ptsp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
