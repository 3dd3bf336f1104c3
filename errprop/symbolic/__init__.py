"""errprop.symbolic: sympy derives, checks and prints what the numeric engine computes.

* :func:`verify_rules` — every op's first-order rule (``jvp``, ``vjp``) against the sympy
  derivative of a symbolic statement of its forward;
* :func:`recursion` — the error recursion of a concrete graph as sympy expressions named
  after its layers, with ``.latex()`` and a numeric evaluation that reproduces the engine;
* mean-field closed forms for random networks and the depth-scaling regime predictor.

Import it explicitly (``import errprop.symbolic``); ``import errprop`` does not load sympy.
"""

from ._forwards import SYMBOLIC_ACTIVATIONS, symbolic_forward
from ._recursion import Apply, Curvature, Equation, Recursion, recursion
from ._rules import RuleCheck, RuleReport, SymbolicOp, builtin_cases, verify_rules
from ._tape import Tape, directional_derivative, elementwise, symbols

__all__ = [
    "Apply",
    "Curvature",
    "Equation",
    "Recursion",
    "recursion",
    "RuleCheck",
    "RuleReport",
    "SYMBOLIC_ACTIVATIONS",
    "SymbolicOp",
    "Tape",
    "builtin_cases",
    "directional_derivative",
    "elementwise",
    "symbolic_forward",
    "symbols",
    "verify_rules",
]
