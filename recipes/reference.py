"""Reference models: timm architectures trained by our own recipe on Fashion-MNIST (32×32 grey),
cached as safetensors for the accuracy benchmark (``recipes/accuracy.py``).

    python recipes/reference.py                      # train every missing reference model
    python recipes/reference.py --models resnet18 --epochs 2
    python recipes/reference.py --models resnet10t --epochs 4 --ship   # the demo model
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn.functional as F

import fashion_mnist

CACHE = Path(__file__).resolve().parent / ".cache" / "reference"
SHIPPED = Path(__file__).resolve().parent.parent / "calib_data"
SIZE = 32
#: timm name → creation arguments beyond num_classes / in_chans (a 32×32 ViT needs small patches)
MODELS: dict[str, dict] = {
    "resnet18": {}, "resnet50": {}, "mobilenetv3_large_100": {}, "convnext_atto": {},
    "deit_tiny_patch16_224": {"img_size": SIZE, "patch_size": 8}, "densenet121": {},
    "resnet10t": {"channels": (32, 64, 128, 256)},  # half width, 5 MB: the offline demo's model
}


def statistics() -> tuple[float, float]:
    """Mean and std of the training images (the normalisation of every reference model)."""
    x = fashion_mnist.load("train")[0].float().div(255)
    return x.mean().item(), x.std().item()


def create(name: str, mean: float, std: float) -> torch.nn.Module:
    """The reference architecture, with a data config that says how to preprocess its inputs."""
    overlay = {"input_size": (1, SIZE, SIZE), "mean": (mean,), "std": (std,), "num_classes": 10,
               "crop_pct": 1.0, "interpolation": "bilinear"}
    return timm.create_model(name, pretrained=False, num_classes=10, in_chans=1,
                             pretrained_cfg_overlay=overlay, **MODELS[name])


def load(name: str) -> torch.nn.Module:
    """A cached reference model in eval mode (train it first with this script)."""
    path = CACHE / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run python recipes/reference.py --models {name}")
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = create(name, float(meta["mean"]), float(meta["std"]))
    safetensors.torch.load_model(model, str(path))
    return model.eval()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` on prepared images ``x`` with labels ``y``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random crop after 2-pixel padding."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    i, j = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[..., i:i + SIZE, j:j + SIZE]


def train(name: str, epochs: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    mean, std = statistics()
    images, labels = fashion_mnist.load("train")
    x = fashion_mnist.prepare(images, SIZE, mean, std)
    test_x = fashion_mnist.prepare(fashion_mnist.load("test")[0], SIZE, mean, std)
    test_y = fashion_mnist.load("test")[1]
    model = create(name, mean, std)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps,
                                                   pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for step, i in enumerate(range(0, len(x), batch)):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(augment(x[idx], g)), labels[idx], label_smoothing=0.1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 100 == 0:
                print(f"{name} epoch {epoch + 1}/{epochs} step {step}: loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - t0
    top1 = evaluate(model, test_x, test_y)
    CACHE.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "mean": str(mean), "std": str(std), "epochs": str(epochs),
            "top1": f"{top1:.2f}", "train_seconds": f"{seconds:.0f}", "seed": str(seed)}
    tmp = CACHE / f"{name}.safetensors.tmp"
    safetensors.torch.save_model(model.eval(), str(tmp), metadata=meta)
    tmp.replace(CACHE / f"{name}.safetensors")
    print(json.dumps(meta), flush=True)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain models already cached")
    parser.add_argument("--ship", action="store_true",
                        help="also write each model as a ptsp artifact into calib_data/ (the demo model)")
    args = parser.parse_args()
    for name in args.models:
        if (CACHE / f"{name}.safetensors").exists() and not args.force:
            print(f"{name}: cached")
        else:
            train(name, args.epochs, args.batch, args.lr, args.seed)
        if args.ship:
            import ptsp

            print(ptsp.save(load(name), SHIPPED / f"{name}.safetensors", overwrite=True,
                            model_args=MODELS[name]))


if __name__ == "__main__":
    main()
