"""ptsp.data: calibration loaders from every source form, and the checks run before any work."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import ptsp
from ptsp.data import calibration_loader, read_batches


@pytest.fixture(scope="module")
def grey_model():
    overlay = {"input_size": (1, 32, 32), "mean": (0.3,), "std": (0.35,), "crop_pct": 1.0}
    return timm.create_model("resnet18", num_classes=10, in_chans=1, pretrained_cfg_overlay=overlay)


def _pil(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


def _check(loader, n: int, shape=(1, 32, 32)):
    batches = read_batches(loader)
    assert sum(len(b) for b in batches) == n
    assert all(tuple(b.shape[1:]) == shape and b.dtype == torch.float32 for b in batches)
    return batches


def test_tensor_source_sampled_without_replacement_and_seeded():
    x = torch.arange(100.0).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    batches = _check(calibration_loader(x, 40, 16), 40, (1, 2, 2))
    assert [len(b) for b in batches] == [16, 16, 8]
    picked = torch.cat(batches)[:, 0, 0, 0]
    assert len(set(picked.tolist())) == 40  # without replacement
    again = torch.cat(read_batches(calibration_loader(x, 40, 16)))[:, 0, 0, 0]
    other = torch.cat(read_batches(calibration_loader(x, 40, 16, seed=1)))[:, 0, 0, 0]
    assert torch.equal(picked, again) and not torch.equal(picked, other)


def test_folder_source(tmp_path, grey_model):
    for i, image in enumerate(_pil(12)):
        image.convert("RGB").save(tmp_path / f"{i}.png")  # RGB files for a grey model
    _check(calibration_loader(tmp_path, 10, 4, model=grey_model), 10)


def test_datasets_source(grey_model):
    import datasets

    ds = datasets.Dataset.from_dict({"image": _pil(20), "label": list(range(20))},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    _check(calibration_loader(ds, 16, 8, model=grey_model), 16)


def _labelled(n: int):
    import datasets

    return datasets.Dataset.from_dict({"image": _pil(n), "label": [i % 3 for i in range(n)],
                                       "index": list(range(n))})


def test_saved_calibration_set_is_a_seeded_sample_read_back_offline(tmp_path, grey_model):
    source = _labelled(30)
    out = ptsp.data.save_calibration_set(source, tmp_path / "calib", 12, seed=3)
    again = ptsp.data.save_calibration_set(source, tmp_path / "again", 12, seed=3)
    assert out.endswith("train.parquet")
    assert open(out, "rb").read() == open(again, "rb").read()
    import datasets

    kept = datasets.load_dataset(str(tmp_path / "calib"), split="train")["index"]
    assert len(set(kept)) == 12 and kept == sorted(kept)
    _check(calibration_loader(tmp_path / "calib", 12, 5, model=grey_model), 12)
    with pytest.raises(ValueError, match="fewer than the num_samples=31"):
        ptsp.data.save_calibration_set(source, tmp_path / "big", 31)
    with pytest.raises(TypeError, match="folder of images or a datasets dataset"):
        ptsp.data.save_calibration_set(torch.zeros(4, 1, 2, 2), tmp_path / "t", 2)


def test_evaluation_loader_keeps_labels_in_order(tmp_path, grey_model):
    ptsp.data.save_calibration_set(_labelled(10), tmp_path, 10, split="test")
    batches = list(ptsp.data.evaluation_loader(tmp_path, grey_model, batch_size=4))
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [i % 3 for i in range(10)]
    assert batches[0][0].shape == (4, 1, 32, 32)
    sample = list(ptsp.data.evaluation_loader(tmp_path, grey_model, num_samples=6, seed=1))
    assert len(sample[0][1]) == 6
    ptsp.data.save_calibration_set(_labelled(10), tmp_path, 10, split="train")
    with pytest.raises(ValueError, match="cannot read split 'validation'"):
        ptsp.data.evaluation_loader(tmp_path, grey_model, split="validation")


def test_a_folder_with_one_split_serves_any_split(tmp_path, grey_model):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i, image in enumerate(_pil(3)):
            image.save(tmp_path / label / f"{i}.png")
    labels = torch.cat([y for _, y in ptsp.data.evaluation_loader(tmp_path, grey_model)])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="labelled items"):
        next(iter(ptsp.data.evaluation_loader(_pil(4), grey_model)))


def test_torch_dataset_of_pairs_and_rgb_model():
    pairs = [(image, 0) for image in _pil(9)]
    model = timm.create_model("resnet18", num_classes=10)  # RGB, 224 config
    _check(calibration_loader(pairs, 9, 4, model=model), 9, (3, 224, 224))


@pytest.mark.parametrize("form", ["tensor", "pair", "dict", "tensor_dataset_loader"])
def test_read_batches_forms(form):
    x = torch.randn(10, 3, 8, 8)
    y = torch.zeros(10, dtype=torch.long)
    loader = {"tensor": [x[:6], x[6:]], "pair": [(x[:6], y[:6]), (x[6:], y[6:])],
              "dict": [{"pixel_values": x[:6], "labels": y[:6]}, {"pixel_values": x[6:]}],
              "tensor_dataset_loader": torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=6)}[form]
    batches = read_batches(loader)
    assert torch.equal(torch.cat(batches), x)


@pytest.mark.parametrize("loader,match", [
    ([], "empty"),
    ([torch.zeros(0, 3, 8, 8)], "empty"),
    ([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], "dtype"),
    ([torch.full((2, 3, 8, 8), float("nan"))], "NaN or Inf"),
    ([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 9, 9)], "batch 1 has images of shape"),
    ([["not", "a", "tensor"]], "not a tensor"),
    ([{"labels": torch.zeros(2)}], "no image"),
])
def test_bad_batches(loader, match):
    with pytest.raises(ValueError, match=match):
        read_batches(loader)


def test_bad_sources(tmp_path, grey_model):
    with pytest.raises(ValueError, match="fewer than the num_samples=11"):
        calibration_loader(torch.randn(10, 1, 4, 4), 11)
    with pytest.raises(ValueError, match="num_samples"):
        calibration_loader(torch.randn(10, 1, 4, 4), 0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        calibration_loader(torch.randn(10, 4, 4), 5)
    with pytest.raises(ValueError, match="pass model="):
        calibration_loader(_pil(4), 2)
    with pytest.raises(TypeError, match="unsupported calibration source"):
        calibration_loader(3.5, 2)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        calibration_loader(tmp_path / "x.txt", 2, model=grey_model)
    with pytest.raises(ValueError, match="no such folder"):  # not taken for a hub name
        calibration_loader(tmp_path / "missing", 2, model=grey_model)
    with pytest.raises(TypeError, match="iterable of batches"):
        read_batches(torch.randn(4, 3, 8, 8))


def test_prune_rejects_bad_calibration_before_any_work():
    model = timm.create_model("resnet18", num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="empty"):
        ptsp.prune(model, [], 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ptsp.prune(model, [torch.full((2, 3, 32, 32), float("inf"))], 0.5)
    with pytest.raises(ValueError, match=r"shape \(1, 32, 32\) do not fit the model"):
        ptsp.prune(model, [torch.randn(2, 1, 32, 32)], 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
