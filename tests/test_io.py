"""ptsp.save / ptsp.load: self-describing artifacts, atomic writes and one clear error per bad file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

import ptsp

from nets import SmallCNN

X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    return ptsp.prune(model, None, 0.5, method="magnitude", target="flops", example_inputs=X[:1])


@pytest.fixture
def saved(pruned, tmp_path):
    return ptsp.save(pruned, tmp_path / "pruned.safetensors")


def _outputs(model):
    with torch.no_grad():
        return model.eval()(X)


def test_round_trip_is_bit_identical_and_keeps_the_plan(pruned, saved):
    loaded = ptsp.load(saved)
    assert torch.equal(_outputs(loaded), _outputs(pruned))
    assert ptsp.plan_of(loaded) == json.loads(json.dumps(ptsp.plan_of(pruned)))
    assert not loaded.training
    with safetensors.safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    base = json.loads(meta["base"])
    assert meta["format"] == "ptsp" and meta["ptsp_version"] == ptsp.__version__
    assert base["timm"] == "resnet18" and base["args"] == {"num_classes": 10, "in_chans": 1}
    assert json.loads(meta["plan"])["method"] == "magnitude"
    # as torch allocates them: on unaligned data some CPU kernels round differently
    assert all(t.data_ptr() % 64 == 0 for t in loaded.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_model_pruned_on_cuda_saves_and_loads_onto_either_device(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1).eval().cuda()
    pruned = ptsp.prune(model, None, 0.5, method="magnitude", target="flops", example_inputs=X[:1].cuda())
    assert next(pruned.parameters()).is_cuda
    path = ptsp.save(pruned, tmp_path / "gpu.safetensors")
    for device in ("cpu", "cuda"):
        loaded = ptsp.load(path, device=device)
        assert {t.device.type for t in loaded.state_dict().values()} == {device}
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in
                   zip(pruned.state_dict().values(), loaded.state_dict().values()))
        with torch.no_grad():
            assert torch.allclose(loaded(X.to(device)).cpu(), pruned(X.cuda()).cpu(), atol=1e-4)


def test_fresh_process_gives_identical_outputs(pruned, saved, tmp_path):
    torch.save(_outputs(pruned), tmp_path / "expected.pt")
    torch.save(X, tmp_path / "x.pt")
    code = (f"import torch, ptsp; m = ptsp.load({str(saved)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"e = torch.load({str(tmp_path / 'expected.pt')!r}); "
            "y = m(x).detach(); assert torch.equal(y, e), (y - e).abs().max(); print('same')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr


def test_pruning_a_loaded_model_again_composes_the_plan(saved, tmp_path):
    loaded = ptsp.load(saved)
    twice = ptsp.prune(loaded, None, 0.3, method="magnitude", target="flops", example_inputs=X[:1])
    path = ptsp.save(twice, tmp_path / "twice.safetensors")
    assert torch.equal(_outputs(ptsp.load(path)), _outputs(twice))


def test_vit_with_custom_patches_round_trips(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10,
                            in_chans=1).eval()
    small = ptsp.prune(vit, None, 0.3, method="magnitude", example_inputs=X[:1])
    loaded = ptsp.load(ptsp.save(small, tmp_path / "vit.safetensors"))
    assert torch.equal(_outputs(loaded), _outputs(small))


def test_non_persistent_buffers_are_rebuilt(tmp_path):
    """levit keeps attention index buffers outside the state dict: the base is built for real."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    small = ptsp.prune(model, None, 0.3, method="magnitude", example_inputs=x[:1])
    loaded = ptsp.load(ptsp.save(small, tmp_path / "levit.safetensors"))
    assert not any(t.is_meta for t in loaded.buffers())
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_creation_arguments_the_model_hides_are_asked_for(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", stem_type="deep", num_classes=10, in_chans=1).eval()
    with pytest.raises(ValueError, match="model_args"):
        ptsp.save(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    path = ptsp.save(model, tmp_path / "a.safetensors", model_args={"stem_type": "deep"})
    assert torch.equal(_outputs(ptsp.load(path)), _outputs(model))


def test_non_timm_model_loads_into_the_given_architecture(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    small = ptsp.prune(model, None, 0.5, method="magnitude", example_inputs=torch.randn(1, 1, 28, 28))
    path = ptsp.save(small, tmp_path / "cnn.safetensors")
    with pytest.raises(ValueError, match="pass model="):
        ptsp.load(path)
    loaded = ptsp.load(path, model=SmallCNN())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), small.eval()(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_stay_tied(tmp_path):
    model = Tied()
    loaded = ptsp.load(ptsp.save(model, tmp_path / "tied.safetensors"), model=Tied())
    assert loaded.a.weight is loaded.b.weight
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


def test_existing_file_is_replaced_only_when_asked(pruned, saved):
    before = saved.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ptsp.save(pruned, saved)
    assert saved.read_bytes() == before
    ptsp.save(pruned, saved, overwrite=True)
    assert torch.equal(_outputs(ptsp.load(saved)), _outputs(pruned))


def test_crash_during_save_leaves_nothing_behind(pruned, saved, monkeypatch):
    before = saved.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    for target in (saved, saved.with_name("new.safetensors")):
        with pytest.raises(KeyboardInterrupt):
            ptsp.save(pruned, target, overwrite=True)
    assert saved.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in saved.parent.iterdir()) == ["pruned.safetensors"]


def _rewrite(path, **meta_changes):
    """The same tensors with some metadata replaced (``None`` deletes a key)."""
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def _plan_with(path, edit):
    with safetensors.safe_open(str(path), "pt") as f:
        plan = json.loads(f.metadata()["plan"])
    edit(plan)
    return json.dumps(plan)


def _drop_a_kept_channel(plan):
    module = next(m for m, ts in plan["kept"].items() if "weight" in ts and "0" in ts["weight"])
    plan["kept"][module]["weight"]["0"].pop()


@pytest.mark.parametrize("spoil,match", [
    (lambda p: p.write_text("not a model"), "not a ptsp file"),
    (lambda p: safetensors.torch.save_file({"w": torch.zeros(2)}, str(p)), "not a ptsp file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1000] + bytes(1000)), "corrupted"),
    (lambda p: _rewrite(p, format_version="99"), "newer than this ptsp"),
    (lambda p: _rewrite(p, digest=None), "corrupted: metadata lacks digest"),
    (lambda p: _rewrite(p, base=json.dumps({"timm": "no_such_net", "args": {}})), "unknown to timm"),
    (lambda p: _rewrite(p, plan=_plan_with(p, _drop_a_kept_channel)), "do not match the plan"),
])
def test_bad_files_give_one_clear_error(saved, spoil, match):
    spoil(saved)
    with pytest.raises(ValueError, match=match) as exc:
        ptsp.load(saved)
    assert "\n" not in str(exc.value)


def test_missing_file_and_folder(pruned, tmp_path):
    with pytest.raises(FileNotFoundError):
        ptsp.load(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ptsp.save(pruned, tmp_path / "no" / "dir.safetensors")
    assert not os.path.exists(tmp_path / "no")
