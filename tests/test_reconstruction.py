"""Reconstruction (phase 1, phase 2, layer-wise, BatchNorm re-estimation), on a model trained
inside the test on the committed Fashion-MNIST sample."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptsp
from ptsp.groups import build_groups
from ptsp.reconstruction import (_CHUNK, RELATIVE_FLOOR, Reconstruction, _Adam, _cache_bytes, _Hooks,
                                 _modified_in_place, _norm, _param_groups, _pieces,
                                 _RelativeError, _augment, _selections, _Target, doomed_masks, join_single_images,
                                 layer_names, phase1, reestimate_bn)
from ptsp.surgery import apply, kept_indices, kept_statistics

from nets import OutOfOrder, SmallCNN, Tokens

SAMPLE = Path(__file__).resolve().parent.parent / "calib_data" / "fashion_mnist"
FAST = Reconstruction(phase1_passes=5, phase2_passes=5, progress=False)


def _split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    items = datasets.load_dataset(str(SAMPLE), split=name)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in items["image"]])).float().div(255)
    return (x.unsqueeze(1) - 0.286) / 0.353, torch.tensor(items["label"])


@pytest.fixture(scope="module")
def fmnist():
    return _split("train") + _split("test")


@pytest.fixture(scope="module")
def trained(fmnist):
    x, y, _, _ = fmnist
    torch.manual_seed(0)
    model = SmallCNN()
    epochs, batch = 5, 100
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 1e-2, total_steps=epochs * math.ceil(len(x) / batch))
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def _top1(model, x, y):
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item() * 100


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_psp_keeps_clearly_more_accuracy_than_magnitude_and_bn(trained, fmnist, device):
    x, _, test_x, test_y = fmnist
    model = copy.deepcopy(trained).to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    calib = ptsp.data.calibration_loader(x, num_samples=512, batch_size=64)
    dense = _top1(model, test_x, test_y)
    top1 = {}
    for method in ("magnitude", "bn", "psp"):
        pruned = ptsp.prune(model, None if method == "magnitude" else calib, 0.5, method=method,
                            target="flops", reconstruction=FAST, example_inputs=x[:1].to(device))
        plan = ptsp.plan_of(pruned)
        assert plan["flops"]["after"] <= 0.5 * plan["flops"]["before"]
        assert {p.device for p in pruned.parameters()} == {test_x.device}
        top1[method] = _top1(pruned, test_x, test_y)
    assert dense > 70
    assert top1["psp"] >= top1["bn"] + 5, top1
    assert top1["psp"] >= top1["magnitude"] + 15, top1
    assert top1["psp"] >= dense - 8, (dense, top1)
    report = ptsp.plan_of(pruned)["report"]
    assert report["samples"] == 512
    assert len(report["phase1"]["loss"]) == len(report["phase2"]["loss"]) == 5
    assert report["phase2"]["loss"][-1] < report["phase2"]["loss"][0]
    assert report["phase1"]["teacher_cached"] and report["phase2"]["teacher_cached"]


def test_same_seed_same_pruned_weights(trained, fmnist):
    x = fmnist[0]
    settings = Reconstruction(phase1_passes=1, phase2_passes=1, progress=False)
    a, b = (ptsp.prune(trained, ptsp.data.calibration_loader(x, 128, 32, seed=3), 0.4,
                       reconstruction=settings) for _ in range(2))
    assert ptsp.plan_of(a)["kept"] == ptsp.plan_of(b)["kept"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["layerwise", "global"])
def test_baselines_recover_over_bn(trained, fmnist, method):
    x, _, test_x, test_y = fmnist
    calib = ptsp.data.calibration_loader(x, 256, 64)
    bn = ptsp.prune(trained, calib, 0.5, method="bn", target="flops", reconstruction=FAST)
    other = ptsp.prune(trained, calib, 0.5, method=method, target="flops", reconstruction=FAST)
    assert ptsp.plan_of(bn)["kept"] == ptsp.plan_of(other)["kept"]  # same plan, one argument apart
    assert _top1(other, test_x, test_y) > _top1(bn, test_x, test_y)


def test_teacher_selection_matches_unchanged_layers():
    """Without weight updates, the first conv of the pruned model computes exactly the teacher's
    kept channels; the loss of a model against itself is zero."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    groups = build_groups(model, x[:1])
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[groups[0].ids[::2]] = True
    kept = kept_indices(groups, removed)
    pruned = apply(copy.deepcopy(model), kept)
    sel = _selections(model, pruned, kept, x[:1])
    dim, idx = sel["features.0.0"][1]
    assert dim == 1 and idx.tolist() == kept["features.0.0"]["weight"][0]
    with torch.no_grad():
        assert torch.allclose(pruned.features[0][0](x), model.features[0][0](x).index_select(1, idx))
    targets = {"features.0.0": _Target(teacher_out=sel["features.0.0"][1])}
    with _Hooks(pruned, model, targets, feed=False, example=x[:1]) as hooks:
        assert hooks.loss(x).item() < 1e-12
    with _Hooks(copy.deepcopy(model), model, {n: _Target() for n in sel}, feed=False, example=x[:1]) as hooks:
        assert hooks.loss(x).item() == 0


class _InPlace(nn.Module):
    """Hooked outputs that later ops modify in place (an in-place activation after a norm, an
    in-place residual add on a conv's output), as timm's blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        z = self.conv2(y)
        z += y
        return z

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.conv(x)
        b = self.bn(a)
        return [a, b, self.conv2(b.relu())]


def _teacher_and_student() -> tuple[_InPlace, _InPlace]:
    torch.manual_seed(0)
    teacher = _InPlace().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student


def test_loss_survives_in_place_ops_and_matches_the_formula():
    """The hooked loss is Σ ||student − teacher||² / ||teacher||² over the layers' outputs as they
    leave each layer, with the right gradient even when later ops modify those outputs in place."""
    teacher, student = _teacher_and_student()
    x = torch.randn(3, 2, 5, 5)
    names = ("conv", "bn", "conv2")
    with _Hooks(student, teacher, {n: _Target() for n in names}, feed=False, example=x[:1]) as hooks:
        assert hooks.mutated == {("bn", "out"), ("conv2", "out")}
        loss = hooks.loss(x)
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        refs = teacher.outputs(x)
    want = sum((s - t).pow(2).sum() / t.pow(2).sum() for s, t in zip(student.outputs(x), refs))
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for g, p in zip(got, student.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("select", [False, True])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("buffers", [False, True])
def test_deferred_loss_is_the_per_layer_loss(select, amp, buffers):
    """An accelerator's loss (the differences and the rest for all layers at once after the
    forward, the gradient back-propagated from the layer outputs) gives the per-layer loss and
    gradient, with outputs modified in place, selected channels and bfloat16 autocast alike, and
    whether the teacher's recordings are our copies (overwritten by the differences) or its own
    tensors, as an accelerator keeps them (run here on the CPU, where it is not the default)."""
    teacher, student = _teacher_and_student()
    x = torch.randn(3, 2, 5, 5)
    targets = {n: _Target() for n in ("conv", "bn", "conv2")}
    if select:
        targets["bn"] = _Target(teacher_out=(1, torch.tensor([0, 2])), student_out=(1, torch.tensor([0, 2])))
    results = []
    for deferred in (False, True):
        hooks = _Hooks(student, teacher, targets, feed=False, example=x[:1])
        hooks.deferred, hooks.buffers = deferred, buffers or not deferred
        with hooks:
            # deferred, the student's in-place activation runs out of place: its norm's output
            # is no longer modified in place, and needs no copy
            assert student.act.inplace is not deferred
            assert ("bn", "out") in hooks.mutated
            assert ("bn", "out") not in hooks.student_mutated
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                loss = hooks.loss(x)
            hooks.backward(loss)
        assert student.act.inplace
        results.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
        student.zero_grad(set_to_none=True)
    (want, want_grads), (got, got_grads) = results
    # under autocast the deferred differences are bfloat16, as the gradients are in both
    tolerance = 1e-3 if amp else 1e-5
    assert got == pytest.approx(want, rel=tolerance) and want > 0
    for g, w in zip(got_grads, want_grads):
        assert (g - w).abs().max() <= 10 * tolerance * w.abs().max(), (g - w).abs().max() / w.abs().max()


def test_loss_is_the_formula_for_every_batch_size_in_reused_buffers():
    """The teacher's outputs go into buffers reused from step to step; a smaller batch uses
    their front, and each step's loss is still the formula's."""
    teacher, student = _teacher_and_student()
    with _Hooks(student, teacher, {n: _Target() for n in ("conv", "bn", "conv2")}, feed=False,
                example=torch.randn(1, 2, 5, 5)) as hooks:
        for n in (4, 3, 4):
            x = torch.randn(n, 2, 5, 5)
            loss = hooks.loss(x)
            with torch.no_grad():
                want = sum((s - t).pow(2).sum() / t.pow(2).sum()
                           for s, t in zip(student.outputs(x), teacher.outputs(x)))
            assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert len(hooks.pool) == 3 and all(len(b) == 4 for b in hooks.pool.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reuse", [True, False])
def test_relative_error_over_chunks(dtype, reuse):
    """Value and gradient of ||out − ref||² / energy over several chunks, in float32 and
    bfloat16, with the loss scaled (backward then scales the kept difference), and the teacher's
    tensor left alone unless it may be reused."""
    torch.manual_seed(0)
    ref = torch.randn(3, _CHUNK + 7).to(dtype)
    out = (ref.float() + 0.1 * torch.randn_like(ref, dtype=torch.float32)).to(dtype).requires_grad_()
    energy = ref.float().pow(2).sum()
    kept = ref.clone()
    loss = 3 * _RelativeError.apply(out, ref, _norm(energy, ref.numel()), reuse)
    loss.backward()
    want = (out.detach().float() - kept.float()).pow(2).sum() / energy
    assert loss.item() == pytest.approx(3 * want.item(), rel=1e-4)
    grad = 6 * (out.detach().float() - kept.float()) / energy
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.grad.float(), grad, rtol=tol, atol=tol * grad.abs().max().item())
    assert reuse or torch.equal(ref, kept)


def test_relative_error_of_a_silent_layer_is_zero():
    out = torch.randn(2, 3, requires_grad=True)
    loss = _RelativeError.apply(out, torch.zeros(2, 3), _norm(torch.tensor(0.0), 6), True)
    loss.backward()
    assert loss.item() == 0 and torch.equal(out.grad, torch.zeros(2, 3))


def test_in_place_probe_leaves_a_training_model_as_it_was():
    """The probe runs one image in eval mode (BatchNorm in train mode cannot take it, and its
    running statistics must not move)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).train()
    before = model[1].running_mean.clone()
    assert _modified_in_place(model, ["0", "1"], torch.randn(1, 2, 1, 1)) == {("1", "out")}
    assert model.training and torch.equal(model[1].running_mean, before)


def test_doomed_masks_cover_rows_columns_and_norm():
    model = SmallCNN()
    groups = build_groups(model, torch.randn(1, 1, 28, 28))
    g = next(g for g in groups if any(m.tensor == "features.1.0.weight" and m.role == "out" for m in g.members))
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[g.ids[:3]] = True
    masks = {id(p): m for p, m in doomed_masks(model, groups, removed)}
    conv, bn, nxt = model.features[1][0], model.features[1][1], model.features[2][0]
    assert masks[id(conv.weight)][:3].all() and not masks[id(conv.weight)][3:].any()
    assert masks[id(bn.weight)][:3].all() and masks[id(bn.bias)][:3].all()
    assert masks[id(nxt.weight)][:, :3].all() and not masks[id(nxt.weight)][:, 3:].any()


def _every_other_channel(model: nn.Module, x: torch.Tensor) -> tuple:
    """The groups of ``model`` and a removal of every other channel of each prunable group."""
    groups = build_groups(model, x[:1])
    removed = np.zeros(groups.num_channels, dtype=bool)
    for g in groups:
        removed[g.ids[::2]] = g.prunable
    return groups, removed, kept_indices(groups, removed)


def test_fade_ends_phase1_with_the_doomed_entries_at_zero(trained, fmnist):
    """Under ``penalty="fade"`` the doomed entries take no gradient step and reach exactly zero on
    the last step, so removing them changes nothing; the kept weights are trained meanwhile."""
    x = fmnist[0][:128]
    groups, removed, kept = _every_other_channel(trained, x)
    student = copy.deepcopy(trained)
    masks = doomed_masks(student, groups, removed)
    before = [p.detach().clone() for p, _ in masks]
    settings = Reconstruction(phase1_passes=2, penalty="fade", progress=False)
    phase1(student, copy.deepcopy(trained), list(x.split(64)), kept, masks, settings,
           probe=apply(copy.deepcopy(trained), kept))
    assert all((p[m] == 0).all() for p, m in masks)
    assert any(not torch.equal(p[~m], b[~m]) for (p, m), b in zip(masks, before))
    with torch.no_grad():
        assert torch.allclose(apply(copy.deepcopy(student), kept).eval()(x), student.eval()(x), atol=1e-5)


def test_fade_with_norms_over_kept_channels_makes_removal_exact():
    """Phase 1 under ``phase1_norms="kept"`` (norms over the kept channels) with the fade penalty
    optimises the very function the pruned model computes: removing the channels, now zero,
    changes no output, even through a channel LayerNorm."""
    torch.manual_seed(0)
    model = Tokens().eval()
    with torch.no_grad():
        model.ls.gamma.fill_(1.0)  # the normed branch counts (layer scale starts at 1e-5)
    x = torch.randn(64, 3, 16, 16)
    groups, removed, kept = _every_other_channel(model, x)
    student = copy.deepcopy(model)
    settings = Reconstruction(phase1_passes=2, penalty="fade", progress=False, amp=False)
    with kept_statistics(student, groups, removed):
        phase1(student, copy.deepcopy(model), list(x.split(32)), kept,
               doomed_masks(student, groups, removed), settings, probe=apply(copy.deepcopy(model), kept))
        with torch.no_grad():
            y = student.eval()(x)
    with torch.no_grad():
        assert torch.allclose(apply(copy.deepcopy(student), kept).eval()(x), y, atol=1e-5)
        assert not torch.allclose(student(x), y, atol=1e-3)  # the full-channel norms differ


def test_phase1_norms_only_change_models_with_channel_norms(trained, fmnist):
    """BatchNorm normalises each channel apart: a CNN without channel norms prunes to the same
    weights under either ``phase1_norms``; a model with a channel LayerNorm does not."""
    def pruned(model, x, norms):
        calib = ptsp.data.calibration_loader(x, 64, 32)
        settings = dataclasses.replace(FAST, phase1_passes=2, phase2_passes=0, phase1_norms=norms)
        return ptsp.prune(model, calib, 0.5, reconstruction=settings, importance="l2").state_dict()

    torch.manual_seed(0)
    for model, x, same in ((trained, fmnist[0], True), (Tokens().eval(), torch.randn(64, 3, 16, 16), False)):
        a, b = pruned(model, x, "kept"), pruned(model, x, "all")
        assert all(torch.equal(a[k], b[k]) for k in a) == same


def test_phase1_lr_sets_only_phase_one_rate(trained, fmnist):
    """``phase1_lr`` is phase 1's learning rate: phase 1 under (lr=a, phase1_lr=b) is phase 1 under
    lr=b, and not under lr=a."""
    x = fmnist[0][:128]
    groups, removed, kept = _every_other_channel(trained, x)

    def squeezed(**settings: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        student = copy.deepcopy(trained)
        phase1(student, copy.deepcopy(trained), list(x.split(64)), kept,
               doomed_masks(student, groups, removed),
               Reconstruction(phase1_passes=2, progress=False, amp=False, **settings),
               probe=apply(copy.deepcopy(trained), kept))
        return [v for v in student.state_dict().values() if v.is_floating_point()]

    split = squeezed(lr=1e-2, phase1_lr=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(split, squeezed(lr=1e-4)))
    assert not all(torch.equal(a, b) for a, b in zip(split, squeezed(lr=1e-2)))


def test_balanced_rates_follow_execution_order():
    model = OutOfOrder()
    x = torch.randn(1, 3, 8, 8)
    lr = {id(p): g["lr"] for g in _param_groups(model, x, 1e-3, True, "execution") for p in g["params"]}
    assert lr[id(model.body.weight)] == pytest.approx(1e-3 / 2)
    assert lr[id(model.head.weight)] == pytest.approx(1e-3)
    reg = {id(p): g["lr"] for g in _param_groups(model, x, 1e-3, True, "registration") for p in g["params"]}
    assert reg[id(model.head.weight)] == pytest.approx(1e-3 / 2)
    flat = _param_groups(model, x, 1e-3, False, "execution")
    assert {g["lr"] for g in flat} == {1e-3}


def test_relative_rates_scale_each_tensor_by_its_rms():
    model = OutOfOrder()
    with torch.no_grad():
        model.head.weight.mul_(10)
        model.head.bias.zero_()
    x = torch.randn(1, 3, 8, 8)
    groups = _param_groups(model, x, 1e-2, True, "execution", relative=True)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(len(g["params"]) == 1 for g in groups)
    for p, rate in ((model.body.weight, 1e-2 / 2), (model.head.weight, 1e-2)):
        assert lr[id(p)] == pytest.approx(rate * p.detach().square().mean().sqrt().item())
    assert lr[id(model.head.bias)] == pytest.approx(1e-2 * RELATIVE_FLOOR)  # zeros still move


def test_adam_with_a_rate_per_parameter_is_torchs_adam_over_groups():
    """One multi-tensor step for all parameters gives torch's Adam over one group per rate, bit
    for bit, parameters that miss a gradient in some steps included."""
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    rates = [1e-3, 3e-3, 1e-2, 5e-4]
    a = _Adam([{"params": [p], "lr": r} for p, r in zip(ours, rates)])
    b = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(theirs, rates)])
    for step in range(12):
        for k, (p, q) in enumerate(zip(ours, theirs)):
            g = torch.randn(5, 3) if (step + k) % 3 else None
            p.grad, q.grad = g, None if g is None else g.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    a.zero_grad()
    assert all(p.grad is None for p in ours)


def test_reestimate_bn_gives_exact_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.1))
    batches = [torch.randn(8, 1, 6, 6) + i for i in range(3)]
    reestimate_bn(model, batches)
    with torch.no_grad():
        y = model[0](torch.cat(batches))
    assert not model.training and model[1].momentum == 0.1
    assert torch.allclose(model[1].running_mean, y.mean((0, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("bn,exact", [("reestimate", True), ("train+reestimate", True), ("train", False)])
def test_bn_settings_end_with_the_statistics_they_promise(trained, fmnist, bn, exact):
    """Explicit re-estimation leaves the exact calibration statistics of the returned weights;
    train mode leaves the momentum averages of the reconstruction (the authors' code)."""
    calib = ptsp.data.calibration_loader(fmnist[0], 64, 32)
    settings = Reconstruction(phase1_passes=1, phase2_passes=1, progress=False, bn=bn)
    pruned = ptsp.prune(trained, calib, 0.5, reconstruction=settings)
    assert not pruned.training
    reference = copy.deepcopy(pruned)
    reestimate_bn(reference, ptsp.data.read_batches(calib))
    norms = [(a, b) for a, b in zip(pruned.modules(), reference.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert norms
    same = all(torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
               and torch.allclose(a.running_var, b.running_var, rtol=1e-4) for a, b in norms)
    assert same == exact


def test_single_images_join_a_neighbour_for_batchnorm_in_train_mode(trained, fmnist):
    sizes = lambda bs: [len(b) for b in bs]
    x = fmnist[0]
    assert sizes(join_single_images(trained, [x[:1], x[:4], x[:1]])) == [6]
    assert sizes(join_single_images(trained, [x[:4], x[:1], x[:4]])) == [5, 4]
    assert sizes(join_single_images(nn.Linear(2, 2), [x[:4], x[:1]])) == [4, 1]  # no BatchNorm
    assert sizes(_pieces(x[:9], 4)) == [4, 5] and sizes(_pieces(x[:9], 3)) == [3, 3, 3]
    with pytest.raises(ValueError, match="two calibration images"):
        join_single_images(trained, [x[:1]])
    # a loader whose last batch holds one image, pieces that would leave one: both run
    settings = Reconstruction(phase1_passes=1, phase2_passes=1, progress=False, micro_batch=4)
    pruned = ptsp.prune(trained, [x[:9], x[9:10]], 0.5, reconstruction=settings)
    assert ptsp.plan_of(pruned)["report"]["samples"] == 10


def test_micro_batches_give_the_same_result(trained, fmnist):
    calib = ptsp.data.calibration_loader(fmnist[0], 64, 32)
    # float32: bfloat16 kernels may round differently for another batch size
    settings = Reconstruction(phase1_passes=1, phase2_passes=1, progress=False, amp=False,
                              bn="reestimate")
    a = ptsp.prune(trained, calib, 0.5, reconstruction=settings)
    b = ptsp.prune(trained, calib, 0.5,
                   reconstruction=dataclasses.replace(settings, micro_batch=8))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


@pytest.mark.parametrize("method,extra", [("psp", {}), ("layerwise", {}),
                                          ("psp", {"micro_batch": 8, "bn": "reestimate"})])
def test_teacher_cache_replays_the_teacher_exactly(trained, fmnist, method, extra):
    calib = ptsp.data.calibration_loader(fmnist[0], 64, 32)
    settings = Reconstruction(phase1_passes=2, phase2_passes=3, progress=False, **extra)
    runs = {gib: ptsp.prune(trained, calib, 0.5, method=method,
                            reconstruction=dataclasses.replace(settings, teacher_cache_gb=gib))
            for gib in (0, None)}
    phases = [k for k in ("phase1", "phase2") if k in ptsp.plan_of(runs[0])["report"]]
    assert phases and all(not ptsp.plan_of(runs[0])["report"][k]["teacher_cached"] for k in phases)
    assert all(ptsp.plan_of(runs[None])["report"][k]["teacher_cached"] for k in phases)
    for (k, va), vb in zip(runs[0].state_dict().items(), runs[None].state_dict().values()):
        assert torch.equal(va, vb), k


def test_teacher_cache_runs_the_teacher_once_per_batch_and_respects_its_budget(trained, fmnist):
    x = fmnist[0][:12]
    student, teacher = copy.deepcopy(trained), copy.deepcopy(trained).requires_grad_(False)
    with torch.no_grad():
        next(student.parameters()).mul_(0.5)
    targets = {n: _Target() for n in layer_names(teacher)}
    batches = [x[:6], x[6:]]
    for budget, cached in ((2**30, True), (1, False)):
        runs = []
        with _Hooks(student, teacher, targets, False, x[:1], budget, len(x)) as hooks:
            handle = teacher.register_forward_pre_hook(lambda m, a: runs.append(len(a[0])))
            losses = [[hooks.loss(b, None, i).item() for i, b in enumerate(batches)] for _ in range(3)]
            handle.remove()
        assert (hooks.cache is not None) == cached
        assert runs == [6, 6] * (1 if cached else 3)
        assert losses[0] == losses[1] == losses[2] and losses[0][0] > 0


def test_teacher_cache_budget_is_the_setting_or_half_the_free_memory():
    cpu = torch.device("cpu")
    assert _cache_bytes(0.5, cpu) == 2**29 and _cache_bytes(0, cpu) == 0
    assert 0 < _cache_bytes(None, cpu) < 2**60


def test_mixing_takes_each_image_with_another_of_its_batch():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()  # image i is all i
    blend = _augment(x, "mixup", torch.Generator().manual_seed(0))
    assert blend.shape == x.shape and not torch.equal(blend, x)
    assert all(img.unique().numel() == 1 for img in blend)  # one weight per image
    cut = _augment(x, "cutmix", torch.Generator().manual_seed(0))
    pasted = cut != x
    rows, cols = pasted.any(0)[0].any(1), pasted.any(0)[0].any(0)
    side = int(rows.sum())
    assert 2 <= side < 8 and int(cols.sum()) == side  # one square, at least a quarter of the side
    outside = ~(rows[:, None] & cols[None, :])
    assert torch.equal(cut[..., outside], x[..., outside])
    for img in cut:  # inside the square: one other image of the batch, or itself
        assert img[0][rows[:, None] & cols[None, :]].unique().numel() == 1
    assert torch.equal(cut, _augment(x, "cutmix", torch.Generator().manual_seed(0)))


def test_flip_and_shift_move_each_image_alone():
    x = torch.randn(16, 2, 9, 12)
    flipped = _augment(x, "flip", torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x)]
    kept = [torch.equal(f, i) for f, i in zip(flipped, x)]
    assert all(m != k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < len(x)
    shifted = _augment(x, "shift", torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    moved = 0
    for s, i in zip(shifted, x):  # a window of the edge-padded image (mirrored or not), ≤ 1 pixel away
        for image in (i, i.flip(-1)):
            padded = F.pad(image[None], (1,) * 4, mode="replicate")[0]
            windows = [(dy, dx) for dy in range(3) for dx in range(3)
                       if torch.equal(s, padded[:, dy:dy + 9, dx:dx + 12])]
            if windows:
                moved += windows != [(1, 1)]
                break
        else:
            raise AssertionError("not a shifted image")
    assert moved > 0
    assert torch.equal(shifted, _augment(x, "shift", torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("augment", ["flip", "shift", "mixup", "cutmix"])
def test_augmented_reconstruction_is_seeded_and_runs_the_teacher_every_pass(trained, fmnist, augment):
    calib = ptsp.data.calibration_loader(fmnist[0], 64, 32)
    settings = Reconstruction(phase1_passes=2, phase2_passes=2, progress=False, augment=augment)
    a, b = (ptsp.prune(trained, calib, 0.5, reconstruction=settings) for _ in range(2))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    report = ptsp.plan_of(a)["report"]
    assert not report["phase1"]["teacher_cached"] and not report["phase2"]["teacher_cached"]
    plain = ptsp.prune(trained, calib, 0.5, reconstruction=dataclasses.replace(settings, augment="none"))
    assert not all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), plain.state_dict().values()))
    if augment != "mixup":  # the others need images
        with pytest.raises(ValueError, match=augment):
            ptsp.prune(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [torch.randn(8, 4)], 0.5,
                       reconstruction=Reconstruction(augment=augment))


def test_authors_settings_run(trained, fmnist):
    calib = ptsp.data.calibration_loader(fmnist[0], 64, 32)
    settings = Reconstruction.authors(phase1_passes=1, phase2_passes=1, progress=False)
    assert settings.penalty == "replace" and settings.bn == "train"
    pruned = ptsp.prune(trained, calib, 0.5, reconstruction=settings)
    assert ptsp.plan_of(pruned)["reconstruction"]["order"] == "registration"
    assert torch.isfinite(pruned(fmnist[2][:8])).all()


def test_non_finite_loss_stops_and_restores(trained, fmnist):
    calib = ptsp.data.calibration_loader(fmnist[0], 64, 16)
    settings = Reconstruction(phase1_passes=0, phase2_passes=3, lr=1e30, progress=False)
    with pytest.warns(UserWarning, match="non-finite"):
        pruned = ptsp.prune(trained, calib, 0.5, method="global", reconstruction=settings)
    assert "non-finite" in ptsp.plan_of(pruned)["report"]["phase2"]["stopped"]
    assert all(torch.isfinite(v).all() for v in pruned.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(pruned(fmnist[2][:8])).all()


@pytest.mark.parametrize("changes,match", [
    ({"penalty": "l1"}, "penalty"), ({"bn": "freeze"}, "bn"), ({"phase1_passes": -1}, "phase1_passes"),
    ({"lr": 0}, "lr"), ({"phase1_lr": 0.0}, "phase1_lr"), ({"phase1_lr": True}, "phase1_lr"),
    ({"lmbda": float("nan")}, "lmbda"), ({"micro_batch": 0}, "micro_batch"),
    ({"balance": "all"}, "balance"), ({"order": "random"}, "order"), ({"phase1_targets": "x"}, "phase1_targets"),
    ({"micro_batch": 1}, "two images"), ({"teacher_cache_gb": -1}, "teacher_cache_gb"),
    ({"teacher_cache_gb": True}, "teacher_cache_gb"), ({"augment": "rotate"}, "augment"),
    ({"relative_lr": 1}, "relative_lr"),
])
def test_bad_settings(changes, match):
    with pytest.raises(ValueError, match=match):
        Reconstruction(**changes)
