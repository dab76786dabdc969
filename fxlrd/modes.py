"""Train/eval flags: run something in eval mode, then give every module its own flag back.

``model.train(was_training)`` is not a restore: it sets one flag on every submodule, so a
batch norm the user froze in eval mode inside a training model would come back training.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn

__all__ = ["eval_mode", "saved_modes"]


def saved_modes(*modules: nn.Module) -> Callable[[], None]:
    """Record the ``training`` flag of ``modules`` and all their submodules; the function
    returned puts each one back."""
    saved = [(m, m.training) for root in modules for m in root.modules()]

    def restore() -> None:
        for module, flag in saved:
            module.training = flag

    return restore


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode for the ``with`` block, then
    restore each submodule's own ``training`` flag, whatever the block raised."""
    restore = saved_modes(*modules)
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        restore()
