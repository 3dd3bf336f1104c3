"""errprop: how quantization error enters a neural network and propagates.

Build a graph (``Sequential``, ``Residual`` and the layers), say which
quantizer applies where (``QuantConfig``), and ``analyze`` it: the exact
fake-quant error and its first-order prediction at every node, split by source.
"""

from ._activation import ACTIVATIONS, Activation, Softmax
from ._analysis import analyze
from ._attention import Attention
from ._builders import mlp, transformer, transformer_block
from ._config import QuantConfig, Source
from ._allocate import Allocation, allocate_bits, bits_for_share, plan_bits
from ._budget import Budget, BudgetRow, budget
from ._budget_matrix import BudgetMatrix, budget_matrix
from ._layer_split import LayerSplit, SplitRow, layer_split
from ._bert import encode, load_bert, minilm_path, tokenize
from ._embedding import Embedding
from ._files import FileFormatError, UntrustedCodeError
from ._io import load, mask_padding, save
from ._convergence import Convergence, ConvergenceRow, convergence
from ._demo import digits_mlp
from ._graph import NodeInfo, Parallel, Residual, Sequential
from ._functional import Graph, Handle, Input
from ._merge import Add, Concat, MatMul, Merge, Mul
from ._network import Network
from ._shape_ops import Reshape, Scale, Slice, Transpose
from ._rotary import Rotary
from ._linear import Linear
from ._onnx import from_onnx
from ._montecarlo import MonteCarloResult, NodeStats, monte_carlo
from ._norm import L2Normalize, LayerNorm, RMSNorm
from ._pool import MeanPool
from ._op import Op
from ._fixed import Fixed, FixedGrid
from ._quant import ErrorModel, Quantizer, Uniform, UniformGrid
from ._gpfq import alphabet_step, gpfq, gpfq_config, spfq
from ._float import FloatFormat, MXFormat
from ._hwgap import IntegerKernel, accumulator_bits
from ._robustness import (BitCurve, BitCurveRow, QuantizationPenalty, ThresholdRow,
                          ThresholdWeights, bit_curve, threshold_weights)
from ._wage import (WAGE, GradientError, GradientErrorRow, ShiftQuantizer, gradient_error,
                    smoothed_sr_variance)
from ._compare import Comparison, ComparisonRow
from ._probes import NodeStatistics
from ._rigorous import RigorousBoundUnavailable
from ._report import NodeResult, Report, SourceResult, relative_residual, sqnr_db
from ._sensitivity import (NoiseGain, SensitivityResult, SensitivityRow, compare_blocks,
                           noise_gain, sensitivity_network)
from ._statistics import OutputStatistics, StatisticsTooLarge
from ._sweep import SweepResult, sweep
from ._sklearn import from_sklearn
from ._torch import from_torch

__version__ = "0.1.0"

__all__ = [
    "Add",
    "Concat",
    "Graph",
    "Handle",
    "Input",
    "MatMul",
    "Merge",
    "Mul",
    "Network",
    "Parallel",
    "Reshape",
    "Rotary",
    "Scale",
    "Slice",
    "Transpose",
    "ACTIVATIONS",
    "Activation",
    "Allocation",
    "Attention",
    "BitCurve",
    "BitCurveRow",
    "Budget",
    "BudgetRow",
    "BudgetMatrix",
    "Comparison",
    "ComparisonRow",
    "Convergence",
    "ConvergenceRow",
    "Embedding",
    "ErrorModel",
    "FileFormatError",
    "FloatFormat",
    "Fixed",
    "GradientError",
    "GradientErrorRow",
    "FixedGrid",
    "IntegerKernel",
    "LayerSplit",
    "L2Normalize",
    "LayerNorm",
    "Linear",
    "MeanPool",
    "MXFormat",
    "MonteCarloResult",
    "NodeInfo",
    "NodeResult",
    "NodeStatistics",
    "NodeStats",
    "NoiseGain",
    "Op",
    "OutputStatistics",
    "QuantConfig",
    "QuantizationPenalty",
    "Quantizer",
    "RMSNorm",
    "Report",
    "Residual",
    "Sequential",
    "Softmax",
    "Source",
    "StatisticsTooLarge",
    "SensitivityResult",
    "SensitivityRow",
    "SplitRow",
    "RigorousBoundUnavailable",
    "SweepResult",
    "SourceResult",
    "ThresholdRow",
    "ThresholdWeights",
    "Uniform",
    "UntrustedCodeError",
    "UniformGrid",
    "accumulator_bits",
    "allocate_bits",
    "alphabet_step",
    "analyze",
    "compare_blocks",
    "bits_for_share",
    "convergence",
    "digits_mlp",
    "from_onnx",
    "from_sklearn",
    "from_torch",
    "gradient_error",
    "ShiftQuantizer",
    "smoothed_sr_variance",
    "WAGE",
    "gpfq",
    "gpfq_config",
    "mlp",
    "monte_carlo",
    "noise_gain",
    "relative_residual",
    "sqnr_db",
    "transformer",
    "transformer_block",
    "bit_curve",
    "budget",
    "budget_matrix",
    "layer_split",
    "encode",
    "load",
    "load_bert",
    "mask_padding",
    "minilm_path",
    "plan_bits",
    "save",
    "sweep",
    "sensitivity_network",
    "spfq",
    "threshold_weights",
    "tokenize",
]
