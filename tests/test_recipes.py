"""The training recipes: the shared loop resumes exactly, and every recipe runs unchanged under
``accelerate launch`` with two CPU processes (ranks agree, artifacts reload)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ptsp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import training  # noqa: E402


class _Crashing(torch.optim.SGD):
    """SGD that raises at step ``crash_at`` (1-based), as a killed run would stop."""
    crash_at: int | None = None
    calls = 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return super().step(closure)


def _fit(state: Path | None, crash_at: int | None = None) -> nn.Module:
    """7 steps over 3 batches per epoch, saved every 2 steps; optionally crash at a step."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 3, (96,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    optimizer = _Crashing(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.crash_at = crash_at
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 7)
    training.fit(training.accelerator(), model, optimizer, training.loader(data, 32, seed=0),
                 steps=7, schedule=schedule, augment=training.augment, state=state, save_every=2)
    return model


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    reference = _fit(None)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, crash_at=6)  # the last save was at step 4: one batch into epoch 2
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 4
    resumed = _fit(tmp_path)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_model_trained_in_bfloat16_comes_back_in_float32(monkeypatch):
    """Under ``accelerate launch --mixed_precision bf16`` the model trains under autocast, but what
    the recipes evaluate and time afterwards is the plain float32 model, as every other row's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        model = _fit(None)
    finally:
        AcceleratorState._reset_state(True)
    assert "_original_forward" not in model.__dict__
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), nn.Sequential.forward(model, x))  # the class's own forward


def _launch(tmp_path: Path, script: str, *args: str) -> dict:
    """Run a recipe with 2 CPU processes; its JSON summary."""
    summary = tmp_path / f"{Path(script).stem}.json"
    _run_two_processes(tmp_path, str(ROOT / "recipes" / script), *args, "--summary", str(summary))
    return json.loads(summary.read_text())


def _run_two_processes(cwd: Path, *args: str) -> None:
    """``accelerate launch`` with 2 CPU processes on a free port (the default one may still be
    held by the previous launch's socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "dense.safetensors"
    result = _launch(tmp, "train.py", "--model", "resnet10t", "--sample", "--steps", "8",
                     "--batch", "16", "--out", str(out))
    return out, result


def test_train_with_two_processes(trained):
    out, result = trained
    assert result["processes"] == 2 and len(set(result["checksums"])) == 1
    assert result["steps"] == 8
    dense = ptsp.load(out)
    assert sum(p.numel() for p in dense.parameters()) == result["params"]


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "pruned.safetensors"
    model = ptsp.load(trained[0])
    return ptsp.save(ptsp.prune(model, None, 0.5, method="magnitude", target="flops"), out)


def test_finetune_with_two_processes(pruned, tmp_path):
    out = tmp_path / "finetuned.safetensors"
    result = _launch(tmp_path, "finetune.py", str(pruned), "--sample", "--steps", "6", "--batch", "16",
                     "--out", str(out))
    assert result["processes"] == 2 and len(set(result["checksums"])) == 1
    tuned, before = ptsp.load(out), ptsp.load(pruned)
    assert ptsp.plan_of(tuned)["kept"] == ptsp.plan_of(before)["kept"]
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), before.parameters()))


def test_scratch_b_with_two_processes(pruned, tmp_path):
    out = tmp_path / "scratch.safetensors"
    result = _launch(tmp_path, "scratch.py", str(pruned), "--budget", "--sample", "--steps", "4",
                     "--batch", "16", "--out", str(out))
    flops = ptsp.plan_of(ptsp.load(pruned))["flops"]
    assert result["mode"] == "Scratch-B" and len(set(result["checksums"])) == 1
    assert result["steps"] == round(4 * flops["before"] / flops["after"])  # the same compute budget
    assert result["flops"] == flops["after"]


def test_scratch_starts_from_a_random_init(pruned):
    import scratch

    model = ptsp.load(pruned)
    trained_weights = [p.clone() for p in model.parameters()]
    scratch.reinitialise(model, seed=0)
    conv = [(a, b) for a, b in zip(trained_weights, model.parameters()) if a.dim() == 4]
    assert all(a.shape == b.shape and not torch.equal(a, b) for a, b in conv)


def test_dhspg_with_two_processes(tmp_path):
    """Same parameters and sparsity on both ranks, the FLOPs target met, compressed outputs equal
    to the full model's, a loadable artifact."""
    out = tmp_path / "slim.safetensors"
    result = _launch(tmp_path, "dhspg.py", "--model", "resnet10t", "--sample", "--steps", "12",
                     "--batch", "16", "--target-flops", "0.5", "--out", str(out))
    assert result["processes"] == 2 and len(set(result["checksums"])) == 1
    assert 0.48 < result["flops_compressed"] / result["flops"] <= 0.5
    assert float(result["max_rel_diff"]) <= 1e-5
    assert isinstance(ptsp.load(out), nn.Module)
    assert len(result["sparsities"]) == 2 and len(set(result["sparsities"])) == 1


def test_compare_with_two_processes(tmp_path):
    """The whole comparison on the committed sample, tiny schedules: every method gives a row, the
    pruned rows meet the FLOPs level, and the table and plot are written."""
    _run_two_processes(tmp_path, str(ROOT / "recipes" / "compare.py"), "--models", "resnet10t",
                       "--levels", "0.5", "--sample", "--reference-epochs", "1", "--epochs-scale", "0.05",
                       "--samples", "64", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path))
    import compare
    import table

    rows = {r["method"]: r for r in table.rows(tmp_path / "compare.csv")}
    assert set(rows) == {"dense", *compare.METHODS}
    assert all(r["processes"] == "2" for r in rows.values())
    for method in ("psp", "psp-4x", "tp", "tp+bn", "finetune", "scratch-e", "scratch-b"):
        assert abs(int(rows[method]["flops"]) / int(rows[method]["flops_dense"]) - 0.5) < 0.02
    assert rows["finetune"]["params"] == rows["psp"]["params"] == rows["scratch-b"]["params"]
    assert float(rows["scratch-b"]["epochs"]) > float(rows["scratch-e"]["epochs"])
    # the rows made from the psp model record the ptsp defaults it ran with: today's
    assert all(not table.stale(rows[m], compare.SETTINGS, {}) for m in compare.FROM_PSP)
    assert rows["tp"]["lr"] == rows["dhspg"]["lr"] == ""
    # accelerate gives each CPU process one thread
    assert all(r["cpu"] == table.cpu(threads=1) for r in rows.values())
    assert all(r["seed"] == "0" and r["samples"] == "64" for r in rows.values())
    # every row is read against psp's time at its level on its machine
    assert all(r["psp_seconds"] == rows["psp"]["seconds"] for m, r in rows.items() if m != "dense")
    report = (tmp_path / "compare.md").read_text()
    assert "| psp |" in report and "--reference-epochs 1 " in report and "--samples 64 " in report
    assert (tmp_path / "compare.png").stat().st_size > 0
    # the reference model trained for this run is recorded with its results, not in the repo's
    assert json.loads((tmp_path / "reference.json").read_text())["resnet10t"]["epochs"] == "1"


def test_a_row_is_stale_when_a_default_it_ran_with_changed():
    import table

    now = table.defaults()
    fields = ("bn", "lr", "max_ratio")
    row = table.settings({"reconstruction": now, "max_ratio": now["max_ratio"]})
    assert not table.stale(row, fields, {})
    doubled = table.settings({"reconstruction": {**now, "lr": now["lr"] * 2}, "max_ratio": now["max_ratio"]})
    assert table.stale(doubled, fields, {})
    assert not table.stale(doubled, ("bn",), {})
    # the same number as an absolute rate (or a relative one) is another setting
    other_kind = table.settings({"reconstruction": {**now, "relative_lr": not now["relative_lr"]},
                                 "max_ratio": now["max_ratio"]})
    assert other_kind["lr"] != row["lr"] and table.stale(other_kind, fields, {})
    # a row written before a setting was recorded ran with what ``recorded_later`` says
    assert table.stale({**row, "max_ratio": ""}, fields, {"max_ratio": "1.0"}) == (now["max_ratio"] != 1.0)
    assert not table.stale({**row, "max_ratio": ""}, fields, {"max_ratio": str(now["max_ratio"])})


def test_the_defaults_line_leaves_out_settings_that_change_no_result():
    import table

    line = table.defaults_line()
    assert "lr=" in line and "bn=" in line
    assert "progress" not in line and "teacher_cache_gb" not in line


def test_the_checks_read_the_targets_off_the_rows():
    import compare

    def row(method, top1, seconds="10", epochs=""):
        return {"model": "m", "level": "0" if method == "dense" else "0.5", "method": method,
                "top1": top1, "dense_top1": "90.00", "seconds": seconds, "epochs": epochs}

    rows = [row("dense", "90.00", epochs="4.0"), row("psp", "89.70"), row("tp", "80.00"),
            row("finetune", "89.95", "30"), row("scratch-b", "90.40", "100", "8.0"),
            row("psp-4x", "89.95", "20")]
    note, = compare.checks(rows)[2:]
    assert "finetune +0.25 points over psp (within 0.5) at 3.0× psp's wall time" in note
    assert "scratch-b +0.70 points over psp (NOT within 0.5) at 10.0×" in note
    # the larger calibration set is read off the table beside the default one, at its own time
    assert "scratch-b +0.45 points over psp-4x (within 0.5) at 5.0× psp-4x's wall time" in note
    # no time ratio between rows timed on different machines
    rows[-1]["cpu"] = "Another CPU, 2 threads"
    note, = compare.checks(rows)[2:]
    assert "scratch-b +0.45 points over psp-4x (within 0.5) timed on another machine" in note
    assert "scratch-b +0.70 points over psp (NOT within 0.5) at 10.0×" in note
    # psp's time on the row's own machine, recorded with it, stands in for psp's row timed elsewhere
    rows[1]["cpu"] = "Another CPU, 2 threads"
    rows[-2]["psp_seconds"] = "5.0"
    note, = compare.checks(rows)[2:]
    assert "scratch-b +0.70 points over psp (NOT within 0.5) at 20.0×" in note
    assert "finetune +0.25 points over psp (within 0.5) timed on another machine" in note
    # a comparator above the dense reference is named, with its epochs against the reference's
    assert "scratch-b beats the dense reference itself by +0.40 (8.0 epochs, the reference 4.0)" in note
    assert "finetune beats" not in note and "psp ahead of tp by +9.70" in note


def test_the_regenerate_command_is_read_off_the_rows(tmp_path):
    """A table grown over several runs names the one command that makes its rows again."""
    import compare

    def row(level, method, **extra):
        return {"model": "resnet10t", "level": level, "method": method, "epochs": "", **extra}

    rows = [row("0", "dense", epochs="48.0", cpu="CPU, 2 threads, bf16 training", seed="1"),
            *(row(lv, m, seed="1", cpu="CPU, 2 threads") for lv in ("0.3", "0.5", "0.7") for m in ("psp", "tp")),
            row("0.5", "finetune", epochs="1.0")]  # written before the seed was recorded: seed 0
    command = compare.regenerate(rows, compare.RESULTS)
    assert command.startswith("`accelerate launch --num_cpu_threads_per_process 2 --mixed_precision bf16 "
                              "recipes/compare.py --models resnet10t "
                              "--methods psp tp finetune --reference-epochs 48`")
    assert "several values of --seed 0 / 1" in command
    assert "which makes 10 rows; the table holds 8 of them" in command
    rows = [{**r, "seed": "1"} for r in rows[:-1]]
    assert compare.regenerate(rows, tmp_path).endswith(
        f"--methods psp tp --reference-epochs 48 --seed 1 --results {os.path.relpath(tmp_path, ROOT)}`")


@pytest.mark.parametrize("bn", ["train+reestimate", "reestimate"])
def test_the_compute_floor_runs_batchnorm_as_the_reconstruction_does(bn):
    import bench_prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).eval()
    batches = list(torch.randn(16, 3, 10, 10).split(8))
    settings = ptsp.Reconstruction(phase1_passes=1, phase2_passes=1, bn=bn, progress=False)
    pruned = ptsp.prune(model, batches, 0.5, importance="l2", reconstruction=settings)
    modes: list[bool] = []  # BatchNorm's mode at every call with gradients (the phases' students)

    def record(module, args):
        if torch.is_grad_enabled():
            modes.append(module.training)
    for m in (*model.modules(), *pruned.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(record)
    bench_prune.floor_seconds(model, pruned, batches, settings)
    assert modes and all(mode == bn.startswith("train") for mode in modes)


def test_the_operation_count_leaves_views_out_and_compares_with_the_floor(tmp_path, monkeypatch):
    import argparse

    import bench_prune

    with bench_prune._Count() as count:
        x = torch.ones(2, 3)
        (x.view(3, 2).t() * 2 + 1).sum()
    assert dict(count.counts) == {"ones": 1, "mul": 1, "add": 1, "sum": 1}
    monkeypatch.setattr(bench_prune, "RESULTS", tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    args = argparse.Namespace(model="tiny", size=10, samples=16, batch=8, ratio=0.5,
                              phase1_passes=1, phase2_passes=1, device="cpu", teacher_cache_gb=0.0)
    settings = ptsp.Reconstruction(phase1_passes=1, phase2_passes=1, teacher_cache_gb=0, progress=False)
    bench_prune.count_ops(model, list(torch.randn(16, 3, 10, 10).split(8)), args, settings)
    text = (tmp_path / "bench_prune_ops.md").read_text()
    assert ("`python recipes/bench_prune.py --model tiny --size 10 --samples 16 --batch 8 "
            "--phase1-passes 1 --phase2-passes 1 --teacher-cache-gb 0 --ops`") in text
    row = text.splitlines()[-1].split(" | ")
    pipeline, floor = int(row[5]), int(row[6])
    assert pipeline > floor > 0 and float(row[7]) == pytest.approx(pipeline / floor, abs=0.01)


def test_the_noise_report_pairs_psp_with_each_method_by_seed(tmp_path):
    import noise
    import table

    for method, top1 in (("psp", ("88.50", "88.20")), ("global", ("88.70", "88.10"))):
        for seed, value in enumerate(top1):
            table.append(tmp_path / "noise.csv", noise.FIELDS, {
                "model": "m", "level": "0.5", "method": method, "seed": str(seed), "top1": value,
                "agree": "98.00", "dense_top1": "89.00", "seconds": "1", "defaults": "d"})
    noise.write_report(tmp_path, "python recipes/noise.py --cache DIR --results elsewhere")
    lines = (tmp_path / "noise.md").read_text().splitlines()
    assert "`python recipes/noise.py --cache DIR --results elsewhere`" in lines[2]
    assert "| global | 88.70 | 88.10 | 88.40 | 0.42 | 98.00 | -0.20 +0.10 | -0.05 |" in lines
    assert "| psp | 88.50 | 88.20 | 88.35 | 0.21 | 98.00 | – | – |" in lines


def test_the_ablation_report_compares_with_the_defaults_row_and_keeps_old_rows(tmp_path, monkeypatch):
    """A row is compared with the defaults row of its model, defaults, arithmetic (bfloat16 or
    not) and calibration draw; a row written before the agreement, bf16 and seed columns existed
    is kept, shown as – (its seed as 0, the draw it used)."""
    import ablation
    import table

    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    monkeypatch.setattr(ablation, "CSV", tmp_path / "ablation.csv")
    old = [f for f in ablation.FIELDS if f not in ("agree", "bf16", "seed")]
    table.append(ablation.CSV, old, {"model": "m", "level": "0.5", "variant": "lr=1e-3", "top1": "88.40",
                                     "dense_top1": "89.00", "seconds": "3", "importance": "auto",
                                     "plan": "l2", "defaults": "d"})
    for variant, top1, agree, bf16, seed in (("defaults", "88.50", "97.00", "", "0"),
                                             ("phase1_lr=3e-4", "88.75", "99.25", "", "0"),
                                             ("penalty=fade", "88.60", "98.00", "yes", "0"),
                                             ("defaults", "88.00", "96.00", "", "1"),
                                             ("phase1_lr=3e-4", "88.30", "98.00", "", "1")):
        table.append(ablation.CSV, ablation.FIELDS, {
            "model": "m", "level": "0.5", "variant": variant, "top1": top1, "agree": agree,
            "dense_top1": "89.00", "seconds": "3", "importance": "auto", "plan": "l2", "defaults": "d",
            "bf16": bf16, "seed": seed})
    ablation.write_report()
    lines = (tmp_path / "ablation.md").read_text().splitlines()
    assert "| m | 50% | auto | l2 | lr=1e-3 | 0 | 88.40 | -0.10 | – | 89.00 | – | 3 |" in lines
    assert "| m | 50% | auto | l2 | phase1_lr=3e-4 | 0 | 88.75 | +0.25 | 99.25 | 89.00 | – | 3 |" in lines
    assert "| m | 50% | auto | l2 | penalty=fade | 0 | 88.60 | – | 98.00 | 89.00 | yes | 3 |" in lines
    assert "| m | 50% | auto | l2 | phase1_lr=3e-4 | 1 | 88.30 | +0.30 | 98.00 | 89.00 | – | 3 |" in lines


def test_the_accuracy_report_of_another_results_folder_names_it(tmp_path, monkeypatch):
    """A study beside the main table (``--cache``/``--results``) writes its own table and plot, says
    how to regenerate it (with the levels and methods of its rows, not the defaults), and marks the
    best method of each cell."""
    import accuracy
    import reference
    import table

    monkeypatch.setattr(reference, "CACHE", tmp_path / "cache" / "reference")
    monkeypatch.setattr(reference, "TRAINED", tmp_path / "reference.json")
    (tmp_path / "reference.json").write_text(json.dumps({"m": {"epochs": "8"}}))
    for method, top1 in (("global", "92.28"), ("psp", "93.00")):
        table.append(tmp_path / "accuracy.csv", accuracy.FIELDS, {
            "model": "m", "method": method, "level": "0.5", "top1": top1, "dense_top1": "93.74",
            "flops": "50", "flops_dense": "100", "params": "40", "params_dense": "100", "seconds": "9",
            "importance": "l2", "bn": "train+reestimate", "lr": "0.003", "max_ratio": "0.9"})
    accuracy.write_report(tmp_path)
    text = (tmp_path / "accuracy.md").read_text()
    assert f"--results {os.path.relpath(tmp_path, ROOT)} --levels 0.5 --methods global psp`" in text
    assert "m: 8 epoch(s)" in text
    assert "| m | 93.74 | −50% FLOPs | – | – | – | 92.28 | **93.00** | -0.74 | l2 |" in text
    assert not (accuracy.RESULTS / "accuracy.md").read_text().count("93.74 | −50% FLOPs | – | – | – | 92.28")


def test_accuracy_measures_again_the_rows_of_another_calibration_set_size(tmp_path):
    """Asked for 2048 calibration images, a row made from 512 (or from before the size was
    recorded) is dropped to be measured again; a data-free magnitude row is kept."""
    import accuracy
    import table

    csv = tmp_path / "accuracy.csv"
    now = table.defaults()
    settings = table.settings({"reconstruction": now, "max_ratio": now["max_ratio"]})  # today's: not stale for that
    for method, samples in (("psp", "2048"), ("global", "512"), ("bn", ""), ("magnitude", "")):
        table.append(csv, accuracy.FIELDS, {"model": "m", "method": method, "level": "0.5", "top1": "90.00",
                                            "dense_top1": "93.00", "samples": samples, **settings})
    done = accuracy._keep_rows_of(csv, "m", "93.00", {(m, "0.5") for m in accuracy.METHODS}, 2048)
    assert done == {("m", "psp", "0.5"), ("m", "magnitude", "0.5")}
    assert {r["method"] for r in table.rows(csv)} == {"psp", "magnitude"}


def test_accuracy_measures_again_the_rows_planned_otherwise_than_auto_today(tmp_path):
    """A calibrated row whose plan is not the one importance="auto" chooses today is dropped to be
    measured again; rows planned as today's, of another level and data-free magnitude are kept."""
    import accuracy
    import table

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    calib = [torch.randn(16, 3, 32, 32)]
    choice = ptsp.plan_of(ptsp.prune(model, calib, 0.5, method="bn", target="flops",
                                     reconstruction=ptsp.Reconstruction(progress=False)))["importance"]
    other = next(c for c in ptsp.pruning.AUTO if c != choice)
    csv = tmp_path / "accuracy.csv"
    rows = [("psp", "0.5", choice), ("global", "0.5", other), ("bn", "0.5", other), ("psp", "0.3", other),
            ("magnitude", "0.5", "l2")]
    for method, level, importance in rows:
        table.append(csv, accuracy.FIELDS, {"model": "m", "method": method, "level": level, "top1": "90.00",
                                            "dense_top1": "93.00", "importance": importance})
    done = {("m", method, level) for method, level, _ in rows}
    assert accuracy._replanned(csv, model, calib, "m", "0.5", done) == {("m", "global", "0.5"), ("m", "bn", "0.5")}
    assert {(r["method"], r["level"]) for r in table.rows(csv)} == {("psp", "0.5"), ("psp", "0.3"), ("magnitude", "0.5")}
    assert accuracy._replanned(csv, model, calib, "m", "0.7", done) == set()


def test_train_on_a_datasets_folder(tmp_path):
    """--data takes a datasets folder (here the committed parquet sample): timm's transforms at the
    model's own input size (3×224×224), and an artifact that reloads."""
    import train

    out = tmp_path / "hub.safetensors"
    result = train.main(["--model", "resnet10t", "--data", str(ROOT / "calib_data" / "fashion_mnist"),
                         "--steps", "2", "--batch", "8", "--out", str(out)])
    model = ptsp.load(out)
    assert result["steps"] == 2 and model.num_classes == 10
    x = torch.randn(2, 3, 224, 224)
    assert model(x).shape == (2, 10)


def test_the_calibrated_sweep_tells_a_pass_from_a_refusal(monkeypatch):
    import calibrated
    import coverage

    row = calibrated.run_one("resnet10t")
    assert row["status"] == "pass" and row["importance"] in ptsp.pruning.AUTO
    assert 1 - calibrated.RATIO - 0.01 <= row["flops_kept"] <= 1 - calibrated.RATIO + 0.005
    x = torch.randn(2, 8)
    monkeypatch.setattr(coverage, "create", lambda name: (nn.Linear(8, 3), x, {}))  # nothing prunable
    row = calibrated.run_one("linear")
    assert row["status"] == "refused" and "no prunable channels" in row["notes"]
