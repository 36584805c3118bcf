"""Scratch-E / Scratch-B (Rethinking the Value of Network Pruning): train a pruned artifact's
architecture from random initialisation.

    accelerate launch recipes/scratch.py resnet18-psp.safetensors --epochs 2              # Scratch-E
    accelerate launch recipes/scratch.py resnet18-psp.safetensors --epochs 2 --budget     # Scratch-B
    accelerate launch --multi_gpu --num_processes 2 recipes/scratch.py pruned.safetensors --sample --steps 20

``--epochs`` is the original model's training length: Scratch-E trains that long; with ``--budget``
(Scratch-B) the epochs are scaled by FLOPs_base / FLOPs_pruned from the artifact's plan, the same
compute budget. Initialisation is timm's for the base model, sliced to the pruned widths; training
is the reference recipe (``training.train``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

import training

import ptsp
from ptsp.io import BASE_ATTR, create_base
from ptsp.surgery import apply


def reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Replace every weight of a loaded artifact by a fresh random initialisation of its base
    architecture (timm's init, so layer scales, zero-init residual norms and position embeddings
    start as timm intends), cut to the artifact's widths."""
    torch.manual_seed(seed)
    fresh = apply(create_base(getattr(model, BASE_ATTR)), ptsp.plan_of(model)["kept"])
    model.load_state_dict(fresh.state_dict(), strict=True)


def main(argv: list[str] | None = None) -> dict | None:
    ap = training.parser(__doc__, lr=2e-3, epochs=2)
    ap.add_argument("artifact", type=Path, help="a pruned model saved by ptsp (only its architecture is used)")
    ap.add_argument("--budget", action="store_true", help="Scratch-B: scale epochs by the FLOPs ratio")
    args = ap.parse_args(argv)
    acc = training.accelerator()
    set_seed(args.seed)
    model = ptsp.load(args.artifact)
    flops = ptsp.plan_of(model)["flops"]
    scale = flops["before"] / flops["after"] if args.budget else 1.0
    reinitialise(model, args.seed)
    data = training.data_for(args.data, model, args.sample)
    steps = args.steps and round(args.steps * scale)
    stats = training.train(acc, model, data, epochs=args.epochs * scale, batch=args.batch, lr=args.lr,
                           seed=args.seed, steps=steps, state=args.state,
                           save_every=args.save_every)
    mode = "B" if args.budget else "E"
    out = args.out or args.artifact.with_name(f"{args.artifact.stem}-scratch{mode.lower()}.safetensors")
    return training.finish(acc, model, data, stats, out, args.summary, mode=f"Scratch-{mode}")


if __name__ == "__main__":
    main()
