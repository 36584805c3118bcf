"""ptsp.prune and ptsp.plan_of: the public entry points, including bad input."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import ptsp

from nets import DataDependent


@pytest.fixture(scope="module")
def resnet():
    return timm.create_model("resnet18", pretrained=False).eval()


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_prune_flops_target_and_plan(resnet):
    before = _state(resnet)
    pruned = ptsp.prune(resnet, None, 0.5, method="magnitude", target="flops", example_inputs=X)
    plan = ptsp.plan_of(pruned)
    assert plan["flops"]["after"] <= 0.5 * plan["flops"]["before"]
    assert plan["flops"]["after"] > 0.4 * plan["flops"]["before"]
    assert plan["params"]["after"] == sum(p.numel() for p in pruned.parameters())
    assert plan["kept"]["conv1"]["weight"]["0"] == sorted(plan["kept"]["conv1"]["weight"]["0"])
    json.dumps(plan)  # JSON-serialisable
    assert pruned(X).shape == (1, 1000)
    after = _state(resnet)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_default_inputs_from_timm_config():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    pruned = ptsp.prune(model, None, 0.3, method="magnitude")
    assert ptsp.plan_of(pruned)["input_shape"] == [1, 3, 224, 224]


def test_ignored_layers(resnet):
    pruned = ptsp.prune(resnet, None, 0.5, method="magnitude", example_inputs=X, ignored_layers=[resnet.layer1[0].conv1, "layer4"])
    assert pruned.layer1[0].conv1.out_channels == 64
    assert pruned.layer4[0].conv1.out_channels == 512 and pruned.fc.in_features == 512
    with pytest.raises(ValueError, match="not a module"):
        ptsp.prune(resnet, None, 0.5, method="magnitude", example_inputs=X, ignored_layers=["nope"])


def test_deterministic(resnet):
    a = ptsp.prune(resnet, None, 0.4, method="magnitude", example_inputs=X)
    b = ptsp.prune(resnet, None, 0.4, method="magnitude", example_inputs=X)
    assert ptsp.plan_of(a)["kept"] == ptsp.plan_of(b)["kept"]


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0}, "strictly between 0 and 1"), ({"ratio": 1.0}, "strictly between 0 and 1"),
    ({"ratio": -0.2}, "strictly between 0 and 1"), ({"ratio": "0.5"}, "strictly between 0 and 1"),
    ({"method": "psp"}, "needs calibration data"), ({"method": "obs"}, "unknown method"),
    ({"target": "macs"}, "target must be one of"), ({"importance": "hessian"}, "unknown importance"),
    ({"round_to": 0}, "round_to"), ({"max_ratio": 1.5}, "max_ratio"),
])
def test_bad_arguments(resnet, kwargs, match):
    before = _state(resnet)
    args = {"ratio": 0.5, "method": "magnitude", **kwargs}
    with pytest.raises(ValueError, match=match):
        ptsp.prune(resnet, None, example_inputs=X, **args)
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())


def test_untraceable_and_non_module():
    model = DataDependent()
    before = _state(model)
    with pytest.raises(ptsp.TraceError, match="cannot trace"):
        ptsp.prune(model, None, 0.5, method="magnitude", example_inputs=torch.randn(1, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ptsp.prune(lambda x: x, None, 0.5, method="magnitude")
    with pytest.raises(ValueError, match="example_inputs is required"):
        ptsp.prune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)), None, 0.5, method="magnitude")


def test_plan_of_unpruned(resnet):
    with pytest.raises(ValueError, match="not produced by ptsp.prune"):
        ptsp.plan_of(resnet)


def test_scale_free_error_ignores_the_logits_scale_only():
    """A plan that only rescales the logits keeps every prediction: error 0 at any positive scale;
    anti-correlated logits are as far as they can be (no negative rescaling)."""
    torch.manual_seed(0)
    dense = torch.randn(64, 10)
    noisy = dense + 0.5 * torch.randn(64, 10)
    error = ptsp.pruning.scale_free_error
    assert error(5.3 * dense, dense) == pytest.approx(0, abs=1e-6)
    assert error(0.2 * noisy, dense) == pytest.approx(error(noisy, dense), abs=1e-6)
    assert 0 < error(noisy, dense) < error(dense + 2 * torch.randn(64, 10), dense) < 1
    assert error(-dense, dense) == 1


def test_auto_importance_keeps_the_least_distorting_plan():
    """importance="auto" plans with l2 and taylor and keeps the plan with the smaller scale-free
    error; a model without logits (here: feature maps) can only be planned by magnitude."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32)
    quiet = ptsp.Reconstruction(progress=False)
    pruned = ptsp.prune(model, [x], 0.5, method="bn", reconstruction=quiet)
    plan = ptsp.plan_of(pruned)
    errors = plan["report"]["importance"]
    assert set(errors) == set(ptsp.pruning.AUTO) and all(e >= 0 for e in errors.values())
    assert plan["importance"] == min(errors, key=errors.get)
    chosen = ptsp.prune(model, [x], 0.5, method="bn", importance=plan["importance"], reconstruction=quiet)
    assert ptsp.plan_of(chosen)["kept"] == plan["kept"]
    features = nn.Sequential(*list(model.children())[:-2])  # no pooling or classifier: 4-D output
    assert ptsp.plan_of(ptsp.prune(features, [x], 0.5, method="bn", reconstruction=quiet))["importance"] == "l2"


@pytest.mark.parametrize("method", ["psp", "layerwise"])
def test_calibrated_methods_on_a_model_that_caches_in_eval_mode(method):
    """levit caches its attention biases in eval mode: Taylor importance and the reconstruction
    take gradients through it (each failed on its second backward), and psp tunes the biases
    (layer-wise cannot: each layer is fed the teacher's input, past the biases)."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", num_classes=10).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        model(x)  # caches filled, as in a model the user has run
    settings = ptsp.Reconstruction(phase1_passes=1, phase2_passes=1, progress=False)
    pruned = ptsp.prune(model, [x[:2], x[2:]], 0.3, method=method, importance="taylor",
                        reconstruction=settings)
    out = pruned(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    biases = [(n, p) for n, p in pruned.named_parameters() if n.endswith("attention_biases")]
    original = dict(model.named_parameters())
    tuned = [not torch.equal(p, original[n]) for n, p in biases if p.shape == original[n].shape]
    assert tuned and any(tuned) is (method == "psp")
