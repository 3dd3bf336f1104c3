"""Per-op-type registries of the symbolic rules: passes look rules up, never test types.

A :class:`Registry` maps an op class to its rule and is filled where the rules are
written (``@RECURSION.register(Linear)``). :meth:`Registry.lookup` walks
``type(op).__mro__``, so a subclass inherits its base's rule (a residual join is an
``Add``) and a rule registered for ``errprop.Op`` is the default of every one-input op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

R = TypeVar("R")


class Registry(Generic[R]):
    """``op class -> rule``; ``what`` names the rule and ``how`` the registration call in
    the error raised for an op type without one."""

    def __init__(self, what: str, how: str) -> None:
        self.what, self.how = what, how
        self._rules: dict[type, R] = {}

    def register(self, *classes: type) -> Callable[[R], R]:
        """Decorator: ``@registry.register(MyOp)`` on the rule of ``MyOp`` (and of its
        subclasses, unless they register their own)."""
        if not classes or not all(isinstance(c, type) for c in classes):
            raise TypeError(f"register: expected op classes, got {classes!r}")

        def add(rule: R) -> R:
            for cls in classes:
                self._rules[cls] = rule
            return rule
        return add

    def find(self, op: object) -> R | None:
        """The rule of ``op``'s class or of its nearest registered base, or None."""
        for cls in type(op).__mro__:
            if cls in self._rules:
                return self._rules[cls]
        return None

    def lookup(self, op: object, where: str | None = None) -> R:
        """Like :meth:`find`, but raise a TypeError naming the op, the node and how to
        register a rule when there is none."""
        rule = self.find(op)
        if rule is None:
            kind = type(op).__name__
            node = f" (node {where!r})" if where else ""
            raise TypeError(f"no {self.what} is registered for {kind}{node}; register one "
                            f"with {self.how.format(kind=kind)}")
        return rule

    def __contains__(self, cls: type) -> bool:
        return cls in self._rules
