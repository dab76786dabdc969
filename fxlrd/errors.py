"""Exceptions raised by fxlrd. Every message names the problem and the way out."""

from __future__ import annotations

__all__ = ["FxlrdError", "ConfigError", "CaptureError", "PlanMismatchError", "ExportError", "ExportMismatchError", "FxlrdWarning"]


class FxlrdError(Exception):
    """Base class of every error fxlrd raises on purpose."""


class ConfigError(FxlrdError, ValueError):
    """A configuration value or argument is invalid."""


class CaptureError(FxlrdError, RuntimeError):
    """The model could not be captured as a torch.fx graph."""


class PlanMismatchError(FxlrdError, ValueError):
    """A plan does not match the model it is applied to."""


class ExportError(FxlrdError, RuntimeError):
    """torch.onnx could not convert the model to ONNX (nothing was written)."""


class ExportMismatchError(FxlrdError, RuntimeError):
    """The exported ONNX model disagrees with the PyTorch model."""


class FxlrdWarning(UserWarning):
    """Something the user asked for was not (fully) done: a target not reached, a cache not
    written, an option that found nothing to act on. The command line always shows these."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first caller outside fxlrd
    (the user's line), however deep inside fxlrd the warning is raised: for a function called
    from `transform`, `plan`, `apply` and `load` alike."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    ours = (here + os.sep, os.path.join(os.path.dirname(here), "passes") + os.sep)  # fxlrd/ and fxlrd.passes
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        frame, level = frame.f_back, level + 1
    return level
