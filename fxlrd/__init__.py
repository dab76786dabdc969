"""fxlrd: low-rank decomposition of PyTorch models as torch.fx passes, tuned for real speed.

    gm = fxlrd.transform(model, fxlrd.LRDConfig(ratio=2))
"""

from . import experts, narrow, recover, zoo
from .api import apply, plan, transform
from .config import LRDConfig
from .errors import CaptureError, ConfigError, ExportError, ExportMismatchError, FxlrdError, FxlrdWarning, PlanMismatchError
from .experts import ExpertFactors
from .export import export_onnx
from .factorized import Factorized
from .freeze import SequentialFreezer, freeze, param_groups
from .io import load, save
from .latency import LatencyConfig
from .metrics import count_macs, count_params
from .plan import LayerPlan, Plan

__version__ = "0.1.0"

__all__ = [
    "LRDConfig",
    "LatencyConfig",
    "Plan",
    "LayerPlan",
    "Factorized",
    "ExpertFactors",
    "plan",
    "apply",
    "transform",
    "save",
    "load",
    "export_onnx",
    "freeze",
    "param_groups",
    "SequentialFreezer",
    "count_params",
    "count_macs",
    "zoo",
    "experts",
    "narrow",
    "recover",
    "FxlrdError",
    "FxlrdWarning",
    "ConfigError",
    "CaptureError",
    "PlanMismatchError",
    "ExportError",
    "ExportMismatchError",
]
