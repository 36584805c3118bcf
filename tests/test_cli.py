"""The ptsp command line: prune → evaluate → save → reload, eval, info, groups; one-line errors
with non-zero exit codes."""
from __future__ import annotations

import re

import pytest
import torch

import ptsp
from ptsp.cli import DEMO_DATA, DEMO_MODEL, main
from ptsp.importance import IMPORTANCE

R18 = ["--model", "resnet18", "--input-size", "64"]


def test_prune_prints_before_after_and_saves(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["prune", *R18, "--ratio", "0.5", "--target", "flops", "--method", "magnitude"])
    out = capsys.readouterr().out
    flops = next(line for line in out.splitlines() if line.startswith("flops")).split()
    assert 50.0 <= -float(flops[-1].rstrip("%")) < 52.0
    assert "reloaded: identical outputs" in out
    assert ptsp.plan_of(ptsp.load(tmp_path / "resnet18-pruned.safetensors"))["method"] == "magnitude"
    main(["prune", *R18, "--ratio", "0.5", "--target", "flops", "--method", "magnitude",
          "--output", "again.safetensors"])
    again = capsys.readouterr().out
    assert again.split("\n", 1)[1].rsplit("\nsaved", 1)[0] == out.split("\n", 1)[1].rsplit("\nsaved", 1)[0]


def test_prune_with_calibration_folder(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    main(["prune", "--model", "resnet18", "--input-size", "32", "--ratio", "0.3", "--calib",
          str(tmp_path), "--num-samples", "4", "--batch-size", "4", "--output",
          str(tmp_path / "out.safetensors")])
    assert "method psp, 4 calibration images" in capsys.readouterr().out


def test_demo_prunes_evaluates_saves_and_reloads(tmp_path, monkeypatch, capsys):
    """The README's offline demo (fewer images here, to stay fast)."""
    monkeypatch.chdir(tmp_path)
    main(["prune", "--num-samples", "128", "--eval-samples", "300"])
    out = capsys.readouterr().out
    top1 = next(line for line in out.splitlines() if line.startswith("top-1")).split()
    dense, pruned = float(top1[-3]), float(top1[-2])
    assert dense > 75 and pruned > dense - 15, out
    assert (tmp_path / "resnet10t-pruned.safetensors").exists()
    main(["info", "resnet10t-pruned.safetensors"])
    info = capsys.readouterr().out
    assert "resnet10t(num_classes=10, in_chans=1, channels=[32, 64, 128, 256])" in info
    assert "method psp" in info
    assert "calibration images: 128" in info and "phase2 reconstruction loss per pass" in info
    widths = [line.split() for line in info.splitlines() if line.startswith("layer") and line[5].isdigit()]
    assert any(int(w[2]) < int(w[3]) for w in widths)  # pruned layers show width < original


def test_prune_a_checkpoint_file(tmp_path, capsys):
    """A timm name plus a weights file (timm's checkpoint_path) with its own head and input."""
    import timm

    torch.manual_seed(1)
    trained = timm.create_model("resnet18", num_classes=7, in_chans=1).eval()
    torch.save(trained.state_dict(), tmp_path / "ckpt.pth")
    out = tmp_path / "out.safetensors"
    main(["prune", "--model", "resnet18", "--checkpoint", str(tmp_path / "ckpt.pth"), "--num-classes",
          "7", "--in-chans", "1", "--input-size", "32", "--method", "magnitude", "--output", str(out)])
    capsys.readouterr()
    expected = ptsp.prune(trained, None, 0.5, method="magnitude", target="flops",
                          example_inputs=torch.randn(1, 1, 32, 32))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(ptsp.load(out)(x), expected(x))


def test_eval_reports_top1(capsys):
    main(["eval", str(DEMO_MODEL), "--data", str(DEMO_DATA), "--num-samples", "200"])
    out = capsys.readouterr().out
    assert float(out.split("top-1 ")[1].split("%")[0]) > 75


def test_info_of_a_dense_artifact(capsys):
    main(["info", str(DEMO_MODEL)])
    out = capsys.readouterr().out
    assert "method none (dense)" in out and "layer4.0.conv2" in out


def test_groups_lists_unprunable(capsys):
    main(["groups", *R18, "--unprunable"])
    out = capsys.readouterr().out
    assert "unprunable: model output" in out and "fc.weight [dim 0] out" in out


@pytest.mark.parametrize("argv,match", [
    (["prune", "--model", "no_such_model"], "unknown timm model"),
    (["prune", *R18, "--ratio", "1.5", "--method", "magnitude"], "strictly between 0 and 1"),
    (["prune", *R18], "needs calibration images"),
    (["prune", *R18, "--method", "magnitude", "--importance", "taylor"], "reads gradients on calibration data"),
    (["prune", *R18, "--method", "magnitude", "--importance", "bogus"], "unknown importance"),
    (["prune", *R18, "--method", "magnitude", "--augment", "cutmix"], "applies to the calibrated methods"),
    (["prune", *R18, "--method", "magnitude", "--passes", "2", "1"], "applies to the calibrated methods"),
    (["prune", *R18, "--passes", "-1", "1"], "phase1_passes must be a non-negative integer"),
    (["prune", "--model", "missing.safetensors"], "does not exist"),
    (["prune", "--model", str(DEMO_MODEL), "--pretrained"], "--pretrained applies to a timm name"),
    (["info", "missing.safetensors"], "does not exist"),
    (["info", __file__], "not a ptsp file"),
    (["eval", "resnet18", "--data", "no/such/folder"], "cannot read split"),
])
def test_errors_exit_nonzero(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_prune_help_names_every_criterion(capsys):
    """The help text lists the criteria by hand (``ptsp --help`` does not import torch): it must
    follow ``ptsp.importance.IMPORTANCE``."""
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("channel criterion: ")[1].split(" (default")[0]
    assert sorted(c.strip() for c in listed.replace(" or ", ", ").split(",")) == sorted([*IMPORTANCE, "auto"])


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        main(["prune", *R18, "--method", "magnitude", "--output", str(out)])
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    main(["prune", *R18, "--method", "magnitude", "--output", str(out), "--overwrite"])
    assert isinstance(ptsp.load(out), torch.nn.Module)


def test_prune_passes_augment_to_the_reconstruction(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["prune", "--num-samples", "64", "--eval-samples", "100", "--augment", "cutmix"])
    assert "reloaded: identical outputs" in capsys.readouterr().out
    plan = ptsp.plan_of(ptsp.load(tmp_path / "resnet10t-pruned.safetensors"))
    assert plan["reconstruction"]["augment"] == "cutmix"


def test_prune_passes_the_number_of_passes_to_the_reconstruction(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["prune", "--num-samples", "64", "--eval-samples", "100", "--passes", "2", "1"])
    assert "reloaded: identical outputs" in capsys.readouterr().out
    report = ptsp.plan_of(ptsp.load(tmp_path / "resnet10t-pruned.safetensors"))["report"]
    assert (len(report["phase1"]["loss"]), len(report["phase2"]["loss"])) == (2, 1)


def test_passes_default_in_the_help_is_the_reconstructions(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("phase 1 and phase 2 (default ")[1].split(";")[0].split()
    assert [int(n) for n in listed] == [ptsp.Reconstruction().phase1_passes, ptsp.Reconstruction().phase2_passes]


def test_augment_choices_follow_the_reconstruction(capsys):
    """The choices are listed by hand (``ptsp --help`` does not import torch): each must be one
    ``ptsp.Reconstruction`` accepts, and a bogus one is refused with exactly this list."""
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("--augment {")[1].split("}")[0].split(",")
    for choice in listed:
        assert ptsp.Reconstruction(augment=choice).augment == choice
    with pytest.raises(ValueError, match=re.escape(str(tuple(listed)))):
        ptsp.Reconstruction(augment="bogus")
