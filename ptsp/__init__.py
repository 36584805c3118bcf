"""ptsp: post-training structured pruning for timm and PyTorch vision models.

    calib = ptsp.data.calibration_loader("images/", num_samples=512, model=model)
    pruned = ptsp.prune(model, calib, ratio=0.5, target="flops")   # two-phase reconstruction
    ptsp.plan_of(pruned)                                            # kept indices, report
    ptsp.save(pruned, "pruned.safetensors")                         # self-describing artifact
    model = ptsp.load("pruned.safetensors")                         # rebuilt without tracing
    ptsp.build_groups(model, example_inputs)                        # the coupled channel groups

    oto = ptsp.OTO(model, example_inputs)                           # or train from scratch (OTOv2)
    optimizer = oto.dhspg(lr=0.1, target_group_sparsity=0.5)        # ... train as usual ...
    slim = oto.compress()                                           # same outputs, fewer channels
"""
__version__ = "0.1.0"

from . import data  # noqa: E402
from .dhspg import DHSPG, OTO  # noqa: E402
from .groups import Group, Groups, build_groups  # noqa: E402
from .io import load, save  # noqa: E402
from .pruning import plan_of, prune  # noqa: E402
from .reconstruction import Reconstruction  # noqa: E402
from .tracing import TraceError  # noqa: E402

__all__ = ["build_groups", "prune", "plan_of", "save", "load", "OTO", "DHSPG", "Reconstruction",
           "data", "Group", "Groups", "TraceError", "__version__"]
