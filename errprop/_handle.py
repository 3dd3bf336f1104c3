"""Handles: the values of a functional graph under construction (see ``errprop.Graph``).

Calling an op, a merge or a network on a :class:`Handle` records a node instead of
computing; this module imports nothing else from errprop, so ops can make handles
without depending on the graph builder.
"""

from __future__ import annotations

import itertools

_order = itertools.count()


class Handle:
    """The value one node of a graph under construction produces (or the input)."""

    __slots__ = ("op", "inputs", "block", "seq")

    def __init__(self, op: object, inputs: tuple, block: object = None) -> None:
        self.op, self.inputs, self.block = op, inputs, block
        self.seq = next(_order)

    def __repr__(self) -> str:
        if self.op is None:
            return "<errprop input>"
        return f"<errprop value of {self.op!r}>"


def Input() -> Handle:
    """The network input of a functional :class:`errprop.Graph`."""
    return Handle(None, ())


def is_symbolic(inputs: tuple) -> bool:
    """Whether a call builds a node (some argument is a handle) rather than computing."""
    return any(isinstance(h, Handle) for h in inputs)


def node(op: object, inputs: tuple, *, arity: int | None = None, block: object = None) -> Handle:
    """A handle for ``op`` applied to ``inputs`` (all handles; ``arity`` checked if given)."""
    for i, h in enumerate(inputs):
        if not isinstance(h, Handle):
            raise TypeError(f"{op!r}: input {i} is a {type(h).__name__}; in a functional "
                            f"graph each op takes the handles other calls return "
                            f"(start from errprop.Input())")
    if arity is not None and len(inputs) != arity:
        raise TypeError(f"{op!r} takes {'one input' if arity == 1 else f'{arity} inputs'}, "
                        f"got {len(inputs)}")
    return Handle(op, tuple(inputs), block=block)
