"""For people who add ops: the base classes and the helpers the built-in ops use.

* :class:`Op` — a one-input op (``forward``, ``jvp`` and the optional rules);
  :class:`Merge` — a several-input node without parameters (``Add``, ``Mul``,
  ``Concat``, ``MatMul``): ``forward(xs)``, ``jvp(xs, y, dxs, dparams)``, ...
* registrars, class decorators that write the optional rules from one declaration:
  :func:`structural` (a merge whose outputs are input elements or sums of them; set
  ``norm_combine = "rss"`` when each output is one input's element), :func:`structural_unary`
  (the same for a one-input op: reshape, transpose, slice), :func:`bilinear` (a
  two-input merge ``y = product(a, b)``; write ``product``, ``factor_norm`` and ``vjp``).

* :func:`register_op` — lets ``errprop.save`` / ``errprop.load`` write and rebuild an op
  class (default rebuild: ``cls(**params, **config(), name=name)``).

See ``docs/adding-an-op.md``; check a new op or merge with
:func:`errprop.testing.check_rule` (a merge's inputs as a list).
"""

from ._activation import ACTIVATIONS
from ._io import register_op
from ._merge import Merge
from ._op import Op, Outer, align_sampled, param_tangent, per_sample_outer, per_sample_sum
from ._registrars import bilinear, frobenius, max_abs, structural, structural_unary

__all__ = ["ACTIVATIONS", "Merge", "frobenius", "max_abs", "Op", "Outer", "align_sampled", "bilinear",
           "param_tangent", "per_sample_outer", "per_sample_sum", "register_op", "structural",
           "structural_unary"]
