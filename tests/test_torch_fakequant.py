"""errprop's fake quantization against PyTorch's, bit for bit.

PyTorch's observers (``MinMaxObserver``, ``PerChannelMinMaxObserver``) compute the scale in
float32, and ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``
compute ``round(x · (1/scale))`` in float32 (half to even). ``Uniform(...,
arithmetic="torch")`` does the same; errprop's default works in float64 and differs next
to rounding ties. On whole models, errprop's exact fake-quant error equals the change of
the torch model's output when torch fake-quantizes its weights and activations.
"""

import copy

import numpy as np
import pytest

import errprop as ep


@pytest.fixture
def ao(torch):
    return torch.ao.quantization


def _data(rng, shape, spread=True):
    """float32 data with per-row magnitudes spread over two decades."""
    x = rng.standard_normal(shape)
    if spread and len(shape) > 1:
        x = x * rng.uniform(0.05, 5.0, (shape[0],) + (1,) * (len(shape) - 1))
    return x.astype(np.float32)


# observer -> (errprop quantizer kwargs, qint8/quint8 range)
OBSERVERS = {
    "tensor-sym-qint8": (dict(cls="MinMaxObserver", dtype="qint8",
                              qscheme="per_tensor_symmetric"),
                         dict(restricted_range=False)),
    "tensor-sym-restricted": (dict(cls="MinMaxObserver", dtype="qint8",
                                   qscheme="per_tensor_symmetric", quant_min=-127, quant_max=127),
                              dict()),
    "tensor-affine-quint8": (dict(cls="MinMaxObserver", dtype="quint8",
                                  qscheme="per_tensor_affine"), dict(symmetric=False)),
    # the default activation observer's reduce_range=True is the range [0, 127]
    "tensor-affine-reduce-range": (dict(cls="MinMaxObserver", dtype="quint8",
                                        qscheme="per_tensor_affine", quant_min=0,
                                        quant_max=127),
                                   dict(symmetric=False, bits=7)),
    "channel-sym-qint8": (dict(cls="PerChannelMinMaxObserver", dtype="qint8",
                               qscheme="per_channel_symmetric"),
                          dict(granularity="channel", restricted_range=False)),
    "channel-affine-quint8": (dict(cls="PerChannelMinMaxObserver", dtype="quint8",
                                   qscheme="per_channel_affine"),
                              dict(granularity="channel", symmetric=False)),
}


def _observe(torch, ao, spec, x):
    spec = dict(spec)
    cls = getattr(ao, spec.pop("cls"))
    spec["dtype"] = getattr(torch, spec["dtype"])
    spec["qscheme"] = getattr(torch, spec["qscheme"])
    obs = cls(**spec)
    obs(torch.from_numpy(x))
    scale, zero = obs.calculate_qparams()
    return obs, scale.numpy().astype(np.float64), zero.numpy().astype(np.float64)


def _uniform(kw, **extra):
    kw = dict(kw)
    return ep.Uniform(kw.pop("bits", 8), **kw, **extra)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(OBSERVERS))
def test_torch_arithmetic_reproduces_the_observer(case, seed, torch, ao):
    spec, kw = OBSERVERS[case]
    x = _data(np.random.default_rng(seed), (16, 40))
    if "affine" in case:
        x = x + np.float32(0.5)  # a one-sided range exercises the zero point
    obs, scale, zero = _observe(torch, ao, spec, x)
    grid = _uniform(kw, arithmetic="torch").fit(x.astype(np.float64))
    assert (grid.qmin, grid.qmax) == (obs.quant_min, obs.quant_max)
    np.testing.assert_array_equal(np.ravel(grid.scale), scale)
    np.testing.assert_array_equal(np.ravel(grid.zero_point), zero)
    # errprop's default float64 scale: the same number before rounding to float32
    default = _uniform(kw).fit(x.astype(np.float64))
    np.testing.assert_allclose(np.ravel(default.scale), scale, rtol=1.2e-7, atol=0)
    if "sym" in case:  # one float64 division rounds to torch's float32 division exactly
        np.testing.assert_array_equal(np.ravel(default.scale).astype(np.float32), scale)


def test_all_zero_tensor_scale_is_floored_like_torch(torch, ao):
    obs, scale, _ = _observe(torch, ao, OBSERVERS["tensor-sym-qint8"][0],
                             np.zeros(5, np.float32))
    grid = ep.Uniform(8, restricted_range=False, arithmetic="torch").fit(np.zeros(5))
    assert grid.scale.item() == scale.item() == float(np.finfo(np.float32).eps)
    assert ep.Uniform(8, restricted_range=False).fit(np.zeros(5)).scale.item() == 1.0


def _onto_ties(rng, x, grid, axis):
    """Move every other element onto a rounding tie ``(k + 1/2 - z)·s`` of ``grid``, in
    float32: there float32 and float64 arithmetic round differently. Ties stay inside
    the data's range, so the observer's scale does not change."""
    s = np.broadcast_to(grid.scale, x.shape)
    z = np.broadcast_to(grid.zero_point, x.shape)
    k = rng.integers(grid.qmin + 1, grid.qmax - 1, x.shape)
    ties = ((k + 0.5 - z) * s).astype(np.float32)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    inside = (ties > lo) & (ties < hi)
    inside[:, 1::2] = False
    return np.where(inside, ties, x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", list(OBSERVERS))
def test_fake_quantize_bit_for_bit(case, bits, torch, ao):
    spec, kw = dict(OBSERVERS[case][0]), dict(OBSERVERS[case][1])
    rng = np.random.default_rng(bits)
    x = _data(rng, (24, 500))
    if "affine" in case:
        x = x + np.float32(1.0)
    if bits == 4:
        kw["bits"] = 4
        if "affine" in case:
            spec.update(quant_min=0, quant_max=15)
        else:
            spec.update(quant_min=-7 if "restricted" in case else -8, quant_max=7)
    per_channel = "channel" in case
    axis = 1 if per_channel else None
    x = _onto_ties(rng, x, _uniform(kw, arithmetic="torch").fit(x.astype(np.float64)), axis)
    _, scale, zero = _observe(torch, ao, spec, x)
    grid = _uniform(kw, arithmetic="torch").fit(x.astype(np.float64))
    np.testing.assert_array_equal(np.ravel(grid.scale), scale)
    np.testing.assert_array_equal(np.ravel(grid.zero_point), zero)
    t = torch.from_numpy(x)
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(
            t, torch.from_numpy(scale).float(), torch.from_numpy(zero).int(), 0,
            grid.qmin, grid.qmax).numpy()
    else:
        ref = torch.fake_quantize_per_tensor_affine(t, scale.item(), int(zero.item()),
                                                    grid.qmin, grid.qmax).numpy()
    ours = grid.quantize(x.astype(np.float64))
    np.testing.assert_array_equal(ours, ref.astype(np.float64))
    # the error model still bounds the (float32) error
    assert np.all(np.abs(ours - x) <= grid.error_model(x.astype(np.float64)).max_abs)
    # errprop's default float64 arithmetic rounds some of these ties the other way
    default = _uniform(kw).fit(x.astype(np.float64))
    differ = default.quantize(x.astype(np.float64)).astype(np.float32) != ref
    assert differ.any() or (bits, case) == (4, "tensor-sym-qint8")


def test_default_arithmetic_is_float64_and_documented():
    q = ep.Uniform(8)
    assert q.arithmetic == "float64" and repr(q) == "Uniform(8)"
    assert "arithmetic='torch'" in repr(ep.Uniform(8, arithmetic="torch"))
    assert ep.Uniform(8, arithmetic="torch") != q
    assert "bit for bit" in ep.Uniform.__doc__
    with pytest.raises(ValueError, match="arithmetic must be one of 'float64', 'torch'"):
        ep.Uniform(8, arithmetic="float32")


# ------------------------------------------------------------------ whole models
WEIGHTS = {"channel": dict(granularity="channel", restricted_range=False),
           "tensor": dict(restricted_range=False)}


def _torch_fake_quant_weights(torch, module, granularity):
    """Fake-quantize every Linear / attention weight of a float32 module in place, as
    torch does (qint8 symmetric; attention's in_proj per Wq / Wk / Wv block)."""
    ao = torch.ao.quantization
    scheme = "per_channel_symmetric" if granularity == "channel" else "per_tensor_symmetric"

    def fq(w):
        obs, scale, zero = _observe(
            torch, ao, dict(cls="PerChannelMinMaxObserver" if granularity == "channel"
                            else "MinMaxObserver", dtype="qint8", qscheme=scheme), w)
        t = torch.from_numpy(w)
        if granularity == "channel":
            return torch.fake_quantize_per_channel_affine(
                t, torch.from_numpy(scale).float(), torch.from_numpy(zero).int(), 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(t, scale.item(), 0, -128, 127)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(fq(m.weight.detach().numpy()))
            elif isinstance(m, torch.nn.MultiheadAttention):
                W = m.in_proj_weight.detach().numpy()
                m.in_proj_weight.copy_(torch.cat([fq(w) for w in np.split(W, 3)]))
    return module


def _models(torch, seed):
    nn = torch.nn
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 5), nn.Softmax(dim=-1))
    post = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=False)
    pre = nn.TransformerEncoderLayer(16, 4, 32, activation="gelu", batch_first=True,
                                     norm_first=True)
    return {"mlp": (mlp, (6, 12)), "post-norm": (post, (3, 5, 16)), "pre-norm": (pre, (3, 5, 16))}


def _out(torch, module, x):
    # autograd on: TransformerEncoderLayer takes the path that calls its submodules
    return module(torch.from_numpy(x)).detach().numpy().astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("name", ["mlp", "post-norm", "pre-norm"])
def test_exact_weight_error_equals_torch_fake_quant_model(name, granularity, seed, torch):
    module, shape = _models(torch, seed)[name]
    module.eval()
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    cfg = ep.QuantConfig(weights=ep.Uniform(8, arithmetic="torch", **WEIGHTS[granularity]))
    report = ep.analyze(ep.from_torch(module), x.astype(np.float64), cfg)
    quantized = _torch_fake_quant_weights(torch, copy.deepcopy(module), granularity)
    # float64: the same quantized weights, so the same error up to float64 roundoff
    x64 = x.astype(np.float64)
    torch_err64 = _out(torch, copy.deepcopy(quantized).double(), x64) - \
        _out(torch, copy.deepcopy(module).double(), x64)
    scale = np.max(np.abs(torch_err64))
    assert scale > 1e-5
    np.testing.assert_allclose(report.exact, torch_err64, rtol=0, atol=1e-10 * scale)
    # float32 torch: the same error up to float32 roundoff of the two forwards
    torch_err32 = _out(torch, quantized, x) - _out(torch, module, x)
    rel = np.linalg.norm(report.exact - torch_err32) / np.linalg.norm(torch_err32)
    assert rel < 1e-3  # measured 4e-5 .. 9e-5


def _quantize_inputs(torch, module, scales):
    """Forward pre-hooks that fake-quantize (quint8, per tensor) the input of every Linear
    and attention, as errprop's activation sources do; ``scales`` is filled by a first
    (calibration) pass, in which the hooks only observe."""
    ao = torch.ao.quantization
    handles = []
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention)) or \
                name.endswith("out_proj"):
            continue

        def hook(mod, args, name=name):
            a = args[0]
            a32 = a.detach().float()
            if name not in scales:
                obs = ao.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
                obs(a32)
                scales[name] = tuple(v.item() for v in obs.calculate_qparams())
                return None
            s, z = scales[name]
            q = torch.fake_quantize_per_tensor_affine(a32, s, int(z), 0, 255).to(a.dtype)
            return (q,) * len(args)

        handles.append(m.register_forward_pre_hook(hook))
    return handles


@pytest.mark.parametrize("name", ["mlp", "post-norm", "pre-norm"])
def test_exact_error_with_activations_equals_torch(name, torch):
    module, shape = _models(torch, 3)[name]
    module.eval()
    x = np.random.default_rng(3).standard_normal(shape)
    cfg = ep.QuantConfig(
        weights=ep.Uniform(8, granularity="channel", restricted_range=False, arithmetic="torch"),
        activations=ep.Uniform(8, symmetric=False, arithmetic="torch"))
    report = ep.analyze(ep.from_torch(module), x, cfg)
    assert sum(s.endswith(".in") for s in report.sources) == 3
    float64 = copy.deepcopy(module).double()
    quantized = _torch_fake_quant_weights(torch, copy.deepcopy(module), "channel").double()
    scales: dict = {}
    _quantize_inputs(torch, float64, scales)
    ref = _out(torch, float64, x)  # calibration pass: observes the float activations
    _quantize_inputs(torch, quantized, scales)
    torch_err = _out(torch, quantized, x) - ref
    np.testing.assert_allclose(report.exact, torch_err, rtol=0,
                               atol=1e-10 * np.max(np.abs(torch_err)))
    # the activation grids are the observers' (errprop's node names are the torch paths)
    for key, (s, z) in scales.items():
        grid = report.sources[f"{key}.in"].grid
        assert (grid.scale.item(), grid.zero_point.item()) == (s, z)
