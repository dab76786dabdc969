"""Train/eval flags: run something in eval mode, then give every module its own flag back.

``model.train(was_training)`` is not a restore: it sets one flag on every submodule, so a
batch norm the user froze in eval mode inside a training model would come back training.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode for the ``with`` block, then
    restore each submodule's own ``training`` flag, whatever the block raised."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag
