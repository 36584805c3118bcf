"""ptsp: post-training structured pruning for timm and PyTorch vision models.

    pruned = ptsp.prune(model, None, ratio=0.5, target="flops")   # data-free magnitude pruning
    ptsp.plan_of(pruned)                                            # kept indices, params, FLOPs
    ptsp.build_groups(model, example_inputs)                        # the coupled channel groups
"""
__version__ = "0.1.0"

from .groups import Group, Groups, build_groups  # noqa: E402
from .pruning import plan_of, prune  # noqa: E402
from .tracing import TraceError  # noqa: E402

__all__ = ["build_groups", "prune", "plan_of", "Group", "Groups", "TraceError", "__version__"]
