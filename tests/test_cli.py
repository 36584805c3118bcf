"""The ptsp command line: tables, group listings, one-line errors with non-zero exit codes."""
from __future__ import annotations

import pytest

from ptsp.cli import main


def test_prune_prints_before_after(capsys):
    main(["prune", "--model", "resnet18", "--input-size", "64", "--ratio", "0.5", "--target", "flops", "--method", "magnitude"])
    out = capsys.readouterr().out
    flops = next(line for line in out.splitlines() if line.startswith("flops")).split()
    assert 50.0 <= -float(flops[-1].rstrip("%")) < 52.0
    assert out.count("layer1.0.conv1 ") == 1  # a width that changed is listed
    main(["prune", "--model", "resnet18", "--input-size", "64", "--ratio", "0.5", "--target", "flops", "--method", "magnitude"])
    again = capsys.readouterr().out
    assert again.split("\n", 1)[1] == out.split("\n", 1)[1]  # same table (the first line has the time)


def test_prune_with_calibration_folder(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    main(["prune", "--model", "resnet18", "--input-size", "32", "--ratio", "0.3", "--calib",
          str(tmp_path), "--num-samples", "4", "--batch-size", "4"])
    assert "method psp, 4 calibration images" in capsys.readouterr().out


def test_groups_lists_unprunable(capsys):
    main(["groups", "--model", "resnet18", "--input-size", "64", "--unprunable"])
    out = capsys.readouterr().out
    assert "unprunable: model output" in out and "fc.weight [dim 0] out" in out


@pytest.mark.parametrize("argv,match", [
    (["prune", "--model", "no_such_model"], "unknown timm model"),
    (["prune", "--model", "resnet18", "--input-size", "64", "--ratio", "1.5", "--method", "magnitude"],
     "strictly between 0 and 1"),
    (["prune", "--model", "resnet18", "--input-size", "64"], "needs calibration images"),
])
def test_errors_exit_nonzero(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    assert match in str(exc.value) + capsys.readouterr().err
