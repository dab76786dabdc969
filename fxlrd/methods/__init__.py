"""The registry of decomposition methods: one `Method` handler each.

    from fxlrd.methods import get_method, register_method, methods
    get_method("tucker2").candidates(...)

A new method is one handler (a `Method` subclass) registered here; the planner, the passes,
the freezer and the exporter need no edit. Built in: ``svd`` (Linear and 1×1 convs),
``tucker2`` (k×k convs, the default) and ``cp`` (k×k convs, ``LRDConfig(conv_method="cp")``).
"""

from __future__ import annotations

from .base import Method, Ranks
from .cp import CP
from .svd import SVD
from .tucker import Tucker2

__all__ = ["Method", "Ranks", "register_method", "get_method", "methods", "all_roles"]

_REGISTRY: dict[str, Method] = {}


def register_method(handler: Method, *, replace: bool = False) -> Method:
    """Add a handler to the registry under ``handler.name``."""
    if not isinstance(handler, Method) or not handler.name:
        raise TypeError(f"a method handler must be a named fxlrd.methods.Method instance, got {handler!r}")
    if handler.name == "keep" or (handler.name in _REGISTRY and not replace):
        raise ValueError(f"a method called {handler.name!r} is already registered")
    _REGISTRY[handler.name] = handler
    return handler


def get_method(name: str) -> Method:
    """The handler registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown decomposition method {name!r}; registered: {sorted(_REGISTRY)}") from None


def methods() -> tuple[str, ...]:
    """The names of the registered methods."""
    return tuple(_REGISTRY)


def all_roles() -> tuple[str, ...]:
    """Every factor role some method makes (``in_proj``, ``core``, ``out_proj``)."""
    seen: dict[str, None] = {}
    for handler in _REGISTRY.values():
        seen.update(dict.fromkeys(handler.paper_trainable))
    return tuple(seen)


for _handler in (SVD(), Tucker2(), CP()):
    register_method(_handler)
