"""Reference models: timm architectures trained by our own recipe on Fashion-MNIST (32×32 grey),
cached as safetensors for the accuracy benchmark (``recipes/accuracy.py``).

    python recipes/reference.py                      # train every missing model of the main tables
    python recipes/reference.py --models resnet18 --epochs 2
    python recipes/reference.py --models resnet10t --epochs 4 --ship   # the demo model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import safetensors.torch
import timm
import torch

import fashion_mnist
import training
from training import SIZE

CACHE = Path(__file__).resolve().parent / ".cache" / "reference"
#: the training metadata of every reference model trained, kept in the repo (the cache is not)
TRAINED = Path(__file__).resolve().parent / "results" / "reference.json"
SHIPPED = Path(__file__).resolve().parent.parent / "calib_data"
#: timm name → creation arguments beyond num_classes / in_chans (a 32×32 ViT needs small patches)
MODELS: dict[str, dict] = {
    "resnet18": {}, "resnet50": {}, "mobilenetv3_large_100": {}, "convnext_atto": {},
    "deit_tiny_patch16_224": {"img_size": SIZE, "patch_size": 8}, "densenet121": {},
    "convnextv2_atto": {}, "nf_regnet_b0": {},  # norms in module code (GRN), standardised weights
    "resnet10t": {"channels": (32, 64, 128, 256)},  # half width, 5 MB: the offline demo's model
}
#: what the commands train and measure unless told otherwise (the main tables' models)
DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenetv3_large_100", "convnext_atto",
                  "deit_tiny_patch16_224", "densenet121", "resnet10t"]


def use_cache(folder: Path, results: Path | None = None) -> None:
    """Read (and train) the reference models in ``folder/reference`` instead of the default cache,
    recording trainings in ``results/reference.json`` when given: a study of other reference
    models (longer-trained ones) beside the main tables."""
    global CACHE, TRAINED
    CACHE = folder / "reference"
    if results is not None:
        TRAINED = results / "reference.json"


def create(name: str, mean: float, std: float, num_classes: int = 10) -> torch.nn.Module:
    """A timm architecture for 1×32×32 Fashion-MNIST (the creation arguments of ``MODELS`` for the
    reference models), with a data config that says how to preprocess its inputs."""
    overlay = {"input_size": (1, SIZE, SIZE), "mean": (mean,), "std": (std,),
               "num_classes": num_classes, "crop_pct": 1.0, "interpolation": "bilinear"}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1,
                             pretrained_cfg_overlay=overlay, **MODELS.get(name, {}))


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


def metadata(name: str) -> dict[str, str]:
    """How the reference model was trained: epochs, seconds, top-1, seed, normalisation (from the
    cache, else from the record of the last training, which outlives the cache)."""
    path = CACHE / f"{name}.safetensors"
    if path.exists():
        with safetensors.safe_open(str(path), "pt") as f:
            return f.metadata()
    return json.loads(TRAINED.read_text()).get(name, {}) if TRAINED.exists() else {}


def prepared(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Fashion-MNIST test images and labels and the training images, normalised as the
    reference ``model`` was trained: what every benchmark evaluates on and calibrates from."""
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    test_images, test_labels = fashion_mnist.load("test")
    return (fashion_mnist.prepare(test_images, SIZE, mean, std), test_labels,
            fashion_mnist.prepare(fashion_mnist.load("train")[0], SIZE, mean, std))


def predictions(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The predicted class of every prepared image in ``x``: a model's top-1 and its agreement with
    another model's predictions both come from one pass."""
    with torch.no_grad():
        return torch.cat([model.eval()(part).argmax(1) for part in x.split(batch)])


def percent(hits: torch.Tensor) -> float:
    """The share of true entries of a boolean tensor, in percent."""
    return hits.float().mean().item() * 100


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` on prepared images ``x`` with labels ``y``."""
    return percent(predictions(model, x, batch) == y)


def train(name: str, epochs: int, batch: int, lr: float, seed: int,
          data: training.Data | None = None) -> dict:
    """Train one reference model with the recipe of ``training.train`` and cache it (on the full
    Fashion-MNIST unless ``data`` says otherwise)."""
    torch.manual_seed(seed)
    data = data or training.fashion_mnist_data()
    model = create(name, data.mean, data.std)
    acc = training.accelerator()
    stats = training.train(acc, model, data, epochs=epochs, batch=batch, lr=lr, seed=seed)
    meta = {"name": name, "mean": str(data.mean), "std": str(data.std), "epochs": str(epochs),
            "train_seconds": f"{stats['seconds']:.0f}", "seed": str(seed),
            "mixed_precision": acc.mixed_precision}
    if acc.is_main_process:  # under accelerate launch, one process writes the cache
        model = acc.unwrap_model(model).cpu().eval()
        meta["top1"] = f"{training.evaluate(model, data):.2f}"
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / f"{name}.safetensors.tmp"
        safetensors.torch.save_model(model, str(tmp), metadata=meta)
        tmp.replace(CACHE / f"{name}.safetensors")
        record = json.loads(TRAINED.read_text()) if TRAINED.exists() else {}
        TRAINED.parent.mkdir(parents=True, exist_ok=True)  # e.g. a fresh compare.py --results
        TRAINED.write_text(json.dumps({**record, name: meta}, indent=1, sort_keys=True) + "\n")
        print(json.dumps(meta), flush=True)
    acc.wait_for_everyone()
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
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
