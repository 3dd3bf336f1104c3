"""For people who add ops: the base class and the helpers the built-in ops use.

See ``docs/adding-an-op.md``; check a new op with :func:`errprop.testing.check_rule`.
"""

from ._activation import ACTIVATIONS
from ._op import Op, Outer, align_sampled, param_tangent, per_sample_outer, per_sample_sum

__all__ = ["ACTIVATIONS", "Op", "Outer", "align_sampled", "param_tangent", "per_sample_outer",
           "per_sample_sum"]
