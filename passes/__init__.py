"""FX passes of fxlrd, installed as ``fxlrd.passes``.

Each pass is a ``torch.fx.passes.infra.pass_base.PassBase``: ``call(gm)`` returns a
``PassResult``, the graph is linted and recompiled, and a second run reports
``modified=False``.
"""

from .branch import BranchPass
from .decompose import DecomposePass
from .freeze import FreezePass
from .merge import MergePass

__all__ = ["DecomposePass", "MergePass", "BranchPass", "FreezePass"]
