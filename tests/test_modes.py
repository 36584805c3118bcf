"""ptsp.modes: the modes of the passes without and with gradients."""
from __future__ import annotations

import torch
from torch import nn

from ptsp.modes import eval_mode, gradient_modes


class _BiasCache(nn.Module):
    """timm's attention-bias pattern (levit, efficientformer, tiny_vit): in eval mode a tensor
    computed from a parameter is cached, and ``train()`` drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))
        self.norm, self.drop = nn.BatchNorm1d(4), nn.Dropout(0.5)
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "_BiasCache":
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.drop(self.norm(x)) + 2 * self.bias
        if "bias" not in self.cache:
            self.cache["bias"] = 2 * self.bias
        return self.drop(self.norm(x)) + self.cache["bias"]


def test_gradient_modes_train_only_norms_and_modules_with_their_own_train():
    torch.manual_seed(0)
    model = nn.Sequential(_BiasCache(), nn.Dropout(0.5))
    with torch.no_grad():
        model.eval()(torch.randn(2, 4))  # the user's model has run: its cache is full
    assert model[0].cache
    for train_bn in (False, True):
        gradient_modes(model, train_bn)
        assert model[0].training and not model[0].cache
        assert [m.training for m in (model, model[0].drop, model[1])] == [False] * 3
        assert model[0].norm.training is train_bn


def test_gradient_steps_through_a_module_that_caches_in_eval_mode():
    """In eval mode the second backward would run through the first step's freed graph, and the
    bias would stay at its cached value; in gradient modes each step sees the updated bias."""
    torch.manual_seed(0)
    model = _BiasCache()
    gradient_modes(model)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(2):
        bias = model.bias.detach().clone()
        optimiser.zero_grad()
        out = model(x)
        with torch.no_grad():
            assert torch.equal(out, model.norm(x) + 2 * bias)
        (out - 1).pow(2).mean().backward()
        assert model.bias.grad.abs().min() > 0
        optimiser.step()
        assert not torch.equal(model.bias, bias)


def test_eval_mode_restores_each_module_s_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model[1].train()
    model[0].eval()
    model[2].eval()
    model.training = True
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, False, True, False]
