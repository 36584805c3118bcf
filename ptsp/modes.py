"""The modes ptsp runs a model in: eval mode for its passes without gradients, and eval mode with
two exceptions for the passes that take gradients (Taylor importance, the reconstruction)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block, each module's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def gradient_modes(model: nn.Module, train_bn: bool = False) -> None:
    """Eval mode (no dropout or stochastic depth: the model's own function) for passes that take
    gradients, except the BatchNorms when ``train_bn`` and the modules that override ``train``.

    Those are in train mode themselves (not their children): timm's attention-bias modules
    (levit, efficientformer, efficientformer_v2, tiny_vit, efficientvit_msra) keep, in eval mode,
    a tensor computed from their parameters, which their ``train()`` drops. Reused from step to
    step it carried one step's graph into the next (every calibrated method failed there with
    "backward through the graph a second time"), and a cache filled without gradients would
    have frozen the attention biases at their first value."""
    model.eval()
    own = [m for m in model.modules() if type(m).train is not nn.Module.train]
    for m in own:
        m.train()  # drops the cache
    in_train = {id(m) for m in own}
    for m in model.modules():
        m.training = id(m) in in_train or (train_bn and isinstance(m, nn.modules.batchnorm._BatchNorm))
