"""DHSPG and OTO: the target group sparsity is met, zero groups stay zero, compression keeps the
outputs and training resumes identically (the 2-process recipe run is in test_recipes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ptsp

from nets import Concat, SmallCNN

G = torch.Generator().manual_seed(0)
X = torch.randn(64, 1, 28, 28, generator=G)
Y = torch.randint(0, 10, (64,), generator=G)


def _train(model, optimizer, steps, x=X, y=Y):
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("variant,lr", [("sgd", 0.1), ("adam", 1e-3), ("adamw", 1e-3)])
def test_target_reached_and_zero_groups_stay_zero(variant, lr):
    torch.manual_seed(0)
    model = SmallCNN()
    oto = ptsp.OTO(model, X[:1])
    opt = oto.dhspg(lr=lr, variant=variant, target_group_sparsity=0.5, start_pruning_steps=40)
    assert opt.num_groups == 16 + 32 + 32 + 64 and opt.redundant_groups is None
    _train(model, opt, 80)  # partition at 40, target forced by 80
    assert opt.target_reached and abs(opt.group_sparsity - 0.5) <= 0.01
    assert len(opt.redundant_groups) == math.floor(0.55 * opt.num_groups)
    zero = set(opt.zero_channels().tolist())
    assert zero <= set(opt.redundant_groups.tolist())
    loss = _train(model, opt, 60)  # recovery: the plain optimiser, zero groups kept at zero
    assert set(opt.zero_channels().tolist()) == zero and math.isfinite(loss)
    slim = oto.compress()
    model.eval()
    assert _rel(model(X), slim(X)) <= 1e-5
    plan = ptsp.plan_of(slim)
    assert plan["method"] == "dhspg" and plan["channels"]["removed"] == len(zero)
    assert plan["params"]["after"] < plan["params"]["before"]


def test_target_is_never_overshot():
    """Projection zeroes no more groups than the target needs, even with a greedy ε."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = ptsp.OTO(model, X[:1]).dhspg(lr=0.1, target_group_sparsity=0.3, epsilon=0.999,
                                       lmbda=0.5, start_pruning_steps=5, pruning_steps=math.inf)
    _train(model, opt, 40)
    assert opt.target_reached
    assert opt.group_sparsity == math.ceil(0.3 * opt.num_groups) / opt.num_groups


def test_flops_target_is_met_to_one_channel_and_survives_a_resume():
    """target_flops sets the group target at the partition: with no tolerance every redundant
    group is zeroed, the FLOPs fall to the target, and one group fewer would not reach it."""
    torch.manual_seed(0)
    model = SmallCNN()
    oto = ptsp.OTO(model, X[:1])
    opt = oto.dhspg(lr=0.1, target_flops=0.5, tolerance_group_sparsity=0.0, start_pruning_steps=10)
    assert opt.target == 0.5  # target_group_sparsity's until the partition
    _train(model, opt, 30)
    assert opt.target_reached
    zero = opt.zero_channels()
    assert opt.target == len(zero) / opt.num_groups != 0.5
    assert sorted(zero.tolist()) == sorted(opt.redundant_groups.tolist())
    # taken evenly: every ptsp group (16 to 64 channels) loses about the same fraction
    fractions = [np.isin(g.ids, zero).mean() for g in oto.groups if np.isin(g.ids, opt.channels).any()]
    assert len(fractions) == 4 and max(fractions) - min(fractions) <= 1 / 16
    plan = ptsp.plan_of(oto.compress())
    assert plan["flops"]["after"] <= 0.5 * plan["flops"]["before"]
    estimator = ptsp.counting.Estimator(model, oto.groups)

    def spared(channel):
        removed = np.zeros(oto.groups.num_channels, dtype=bool)
        removed[zero[zero != channel]] = True
        return estimator.flops(removed)
    # the last group the partition took was needed: sparing it misses the target
    assert any(spared(c) > 0.5 * plan["flops"]["before"] for c in zero)
    again = ptsp.OTO(model, X[:1]).dhspg(lr=0.1, target_flops=0.5, tolerance_group_sparsity=0.0,
                                          start_pruning_steps=10)
    again.load_state_dict(opt.state_dict())
    assert again.target == opt.target and again.target_reached


def test_resume_from_state_dict_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = ptsp.OTO(model, X[:1]).dhspg(lr=1e-3, variant="adam", start_pruning_steps=20)
    _train(model, opt, 30)  # past the partition, before the target
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, 30)
    resumed = SmallCNN()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    opt2 = ptsp.OTO(resumed, X[:1]).dhspg(lr=1e-3, variant="adam", start_pruning_steps=20)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 30)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.group_sparsity == opt.group_sparsity and opt2.target_reached


def test_timm_model_compresses_and_saves(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    x = torch.randn(8, 1, 32, 32)
    y = torch.randint(0, 10, (8,))
    oto = ptsp.OTO(model, x[:1])
    opt = oto.dhspg(lr=0.05, target_group_sparsity=0.4, start_pruning_steps=2, pruning_steps=2)
    _train(model, opt, 6, x, y)
    assert abs(opt.group_sparsity - 0.4) <= 0.01
    slim = oto.compress()
    model.eval()
    assert _rel(model(x), slim(x)) <= 1e-5
    loaded = ptsp.load(ptsp.save(slim, tmp_path / "slim.safetensors"))
    assert torch.equal(loaded(x), slim(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_model_traced_on_the_cpu_trains_and_compresses_on_cuda():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    oto = ptsp.OTO(model, x[:1])  # as the recipes do: traced first, then moved by accelerate
    model.cuda()
    opt = oto.dhspg(lr=0.05, target_group_sparsity=0.4, start_pruning_steps=2, pruning_steps=2)
    _train(model, opt, 6, x.cuda(), y.cuda())
    assert abs(opt.group_sparsity - 0.4) <= 0.01
    slim = oto.compress()
    model.eval()
    assert next(slim.parameters()).is_cuda
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 convolutions
        assert _rel(model(x.cuda()), slim(x.cuda())) <= 1e-4


def test_zero_groups_are_read_from_parameters_not_bn_statistics():
    """γ = β = 0 (with the conv rows) makes a channel zero whatever its running statistics."""
    torch.manual_seed(0)
    model = SmallCNN()
    oto = ptsp.OTO(model, X[:1])
    opt = oto.dhspg(lr=0.1)
    _train(model, torch.optim.SGD(model.parameters(), 0.05), 5)  # running statistics non-zero
    bn, conv = model.features[1][1], model.features[1][0]
    with torch.no_grad():
        for t in (conv.weight[:5], bn.weight[:5], bn.bias[:5]):
            t.zero_()
    assert bn.running_mean[:5].abs().sum() > 0
    assert len(opt.zero_channels()) == 5
    slim = oto.compress()
    model.eval()
    assert slim.features[1][0].out_channels == conv.out_channels - 5
    assert _rel(model(X), slim(X)) <= 1e-5


def test_every_producer_of_a_concat_keeps_a_channel():
    torch.manual_seed(0)
    model, x = Concat(), torch.randn(4, 3, 16, 16)
    oto = ptsp.OTO(model, x[:1])
    opt = oto.dhspg(lr=0.1, target_group_sparsity=0.9, tolerance_group_sparsity=0.1,
                    start_pruning_steps=1, pruning_steps=1)
    _train(model, opt, 4, x, torch.randint(0, 5, (4,)))
    assert opt.target_reached
    slim = oto.compress()
    assert all(m.out_channels >= 1 for m in slim.modules() if isinstance(m, nn.Conv2d))
    model.eval()
    assert _rel(model(x), slim(x)) <= 1e-5


class Gate(nn.Module):
    """conv → sigmoid → conv: zero producers give sigmoid(0) = 0.5, not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.sigmoid(self.b(torch.relu(self.a(x))))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_only_zero_invariant_channels_are_candidates():
    model = Gate()
    opt = ptsp.OTO(model, torch.randn(1, 1, 12, 12)).dhspg(lr=0.1)
    groups = ptsp.build_groups(model, torch.randn(1, 1, 12, 12))
    owner = {int(c): g.members[0].tensor for g in groups for c in g.ids}
    assert {owner[int(c)] for c in opt.channels} == {"a.weight", "c.weight"}


@pytest.mark.parametrize("kwargs,match", [
    ({"target_group_sparsity": 0.0}, "target_group_sparsity must be in \\(0, 1\\)"),
    ({"target_group_sparsity": 1.0}, "target_group_sparsity must be in \\(0, 1\\)"),
    ({"epsilon": 1.0}, "epsilon must be in \\[0, 1\\)"),
    ({"epsilon": -0.1}, "epsilon must be in \\[0, 1\\)"),
    ({"variant": "rmsprop"}, "variant must be one of"),
    ({"lr": -1.0}, "lr must be a finite number"),
    ({"tolerance_group_sparsity": 1.5}, "tolerance_group_sparsity"),
    ({"start_pruning_steps": -1}, "start_pruning_steps must be an integer"),
    ({"pruning_steps": 0}, "pruning_steps must be a positive integer"),
    ({"weight_decay_type": "group"}, "weight_decay_type"),
    ({"target_flops": 1.0}, "target_flops must be in \\(0, 1\\)"),
    ({"target_flops": 0.999}, "target_flops=0.999 cannot be reached"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ptsp.OTO(SmallCNN(), X[:1]).dhspg(**kwargs)


def test_compress_before_training_is_an_error():
    with pytest.raises(RuntimeError, match="dhspg"):
        ptsp.OTO(SmallCNN(), X[:1]).compress()
