"""errprop.symbolic: sympy derives, checks and prints what the numeric engine computes.

* :func:`verify_rules` — every op's first-order rule (``jvp``, ``vjp``) against the sympy
  derivative of a symbolic statement of its forward;
* :func:`recursion` — the error recursion of a concrete graph as sympy expressions named
  after its layers (merges included), with ``.latex()`` and a numeric evaluation that
  reproduces the engine;
* mean-field closed forms for random networks and the depth-scaling regime predictor.

Symbolic forwards and recursion rules are registered per op type
(:func:`register_forward`, :func:`register_recursion`).

Import it explicitly (``import errprop.symbolic``); ``import errprop`` does not load sympy.
"""

from ._depth import Accumulation, accumulation, depth_exponent
from ._forwards import SYMBOLIC_ACTIVATIONS, register_forward, symbolic_forward
from ._meanfield import (ARCHITECTURES, ClosedForm, MeanField, attention_p2, closed_form,
                         constants, evaluate_closed_form, gaussian_moments, mean_field,
                         relative_weight_noise, tanh_fixed_point)
from ._matexpr import Apply, Curvature
from ._recursion import Equation, Recursion, recursion
from ._recursion_rules import register_recursion
from ._rules import RuleCheck, RuleReport, SymbolicOp, builtin_cases, verify_rules
from ._simulate import random_network, simulate
from ._tape import Tape, directional_derivative, elementwise, symbols

__all__ = [
    "ARCHITECTURES",
    "Accumulation",
    "ClosedForm",
    "MeanField",
    "accumulation",
    "attention_p2",
    "closed_form",
    "constants",
    "depth_exponent",
    "evaluate_closed_form",
    "gaussian_moments",
    "mean_field",
    "random_network",
    "relative_weight_noise",
    "simulate",
    "tanh_fixed_point",
    "Apply",
    "Curvature",
    "Equation",
    "Recursion",
    "recursion",
    "register_recursion",
    "register_forward",
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
