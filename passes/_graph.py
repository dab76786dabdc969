"""Small graph-surgery helpers shared by the passes."""

from __future__ import annotations

from torch import fx, nn

__all__ = ["set_submodule", "replace_with_chain"]

# Metadata that describes a node's *output value*: wrong for the new inner nodes of a chain.
_VALUE_META = ("tensor_meta", "val", "example_value")


def set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Swap the submodule at ``qualified_name`` on its parent, so its name is kept."""
    parent_name, _, leaf = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def replace_with_chain(gm: fx.GraphModule, node: fx.Node, targets: list[str], extra_meta: list[dict]) -> fx.Node:
    """Replace a one-input ``call_module`` node by ``call_module`` nodes of ``targets`` in a chain.

    Each new node copies the old node's meta (stack trace, nn_module_stack) and gets
    ``meta["fxlrd"]`` from ``extra_meta``; the last one takes the old node's uses.
    """
    value = node.args[0]
    last = node
    with gm.graph.inserting_before(node):
        for i, (target, fx_meta) in enumerate(zip(targets, extra_meta)):
            last = gm.graph.call_module(target, (value,))
            last.meta = dict(node.meta)
            if i < len(targets) - 1:
                for key in _VALUE_META:
                    last.meta.pop(key, None)
            last.meta["fxlrd"] = fx_meta
            value = last
    node.replace_all_uses_with(last)
    gm.graph.erase_node(node)
    return last
