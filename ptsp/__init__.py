"""ptsp: post-training structured pruning for timm and PyTorch vision models.

    calib = ptsp.data.calibration_loader("images/", num_samples=512, model=model)
    pruned = ptsp.prune(model, calib, ratio=0.5, target="flops")   # two-phase reconstruction
    ptsp.plan_of(pruned)                                            # kept indices, report
    ptsp.save(pruned, "pruned.safetensors")                         # self-describing artifact
    model = ptsp.load("pruned.safetensors")                         # rebuilt without tracing
    ptsp.build_groups(model, example_inputs)                        # the coupled channel groups
"""
__version__ = "0.1.0"

from . import data  # noqa: E402
from .groups import Group, Groups, build_groups  # noqa: E402
from .io import load, save  # noqa: E402
from .pruning import plan_of, prune  # noqa: E402
from .reconstruction import Reconstruction  # noqa: E402
from .tracing import TraceError  # noqa: E402

__all__ = ["build_groups", "prune", "plan_of", "save", "load", "Reconstruction", "data", "Group",
           "Groups", "TraceError", "__version__"]
