"""Capture: an ``nn.Module`` becomes a ``torch.fx.GraphModule``, or a clear error says why not."""

from __future__ import annotations

import copy
import os
import traceback
from typing import Sequence

import torch
from torch import fx, nn

from .errors import CaptureError

__all__ = ["capture", "check_module"]

_TORCH_DIR = os.path.dirname(torch.__file__)


def check_module(model: object, what: str = "model") -> nn.Module:
    """Raise a TypeError unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{what} must be a torch.nn.Module (or a torch.fx.GraphModule), got {type(model).__name__}; "
            "pass the model object itself, not its state_dict or a path"
        )
    return model


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str]):
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the failing trace that is not inside torch: the user's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.sep + "fxlrd" + os.sep not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"\n  at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def capture(
    model: nn.Module, *, leaf_modules: Sequence[type[nn.Module] | str] = (), copy_model: bool = True
) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` symbolic tracing.

    Args:
        model: the model; an already traced ``GraphModule`` is taken as it is.
        leaf_modules: module types or qualified names to keep opaque while tracing.
        copy_model: trace a deep copy, so the result shares no module with ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        CaptureError: tracing failed; the message names the user code that failed.
    """
    check_module(model)
    if copy_model:
        model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001  (any tracing failure is reported the same way)
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}{_user_frame(exc)}\n"
            "Way out: mark the submodule holding that code as a leaf, "
            "LRDConfig(leaf_modules=[TheSubmoduleType or 'its.qualified.name']) "
            "(layers inside a leaf are not decomposed), or make the code traceable "
            "(no Python control flow on tensor values)."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
