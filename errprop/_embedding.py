"""Token embedding lookup: integer ids in, vectors out (the first op of a BERT model)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._checks import check_int
from ._op import Array, Op, as_param, check_mask, sample_norm


class Embedding(Op):
    r"""Word + position (+ token type 0) embedding of token ids, BERT style.

    Parameters
    ----------
    word : array ``(vocab, d)``
    position : array ``(max_tokens, d)``, optional
    token_type : array ``(types, d)``, optional; row 0 is added (single-segment input)
    pad_id : int, optional: the padding token. The op checks that the ids hold padding
        exactly where the padding mask (set with :func:`errprop.mask_padding`) says, so a
        padded batch cannot run through unmasked attention by mistake.

    Notes
    -----
    For ids ``t: (batch, tokens)``: ``y[n, i] = word[t[n, i]] + position[i] + token_type[0]``.
    The input is a lookup index, not a value: it carries no error and cannot be quantized.
    The output is linear in the tables, so the first-order rule is the same lookup in
    the table errors, and it is exact::

        Δy[n, i] = Δword[t[n, i]] + Δposition[i] + Δtoken_type[0]
    """

    prefix = "embed"
    maskable = True
    ndim_change = 1
    max_ndim = 2
    integer_input = True

    def __init__(self, word: object, position: object | None = None,
                 token_type: object | None = None, *, pad_id: int | None = None,
                 mask: object | None = None, name: str | None = None) -> None:
        super().__init__(name)
        label = f"Embedding {name!r}" if name else "Embedding"
        word = as_param(word, layer=label, param="word", ndim=2)
        d = word.shape[1]
        self.params["word"] = word
        for key, value in (("position", position), ("token_type", token_type)):
            if value is not None:
                table = as_param(value, layer=label, param=key, ndim=2)
                if table.shape[1] != d:
                    raise ValueError(f"{label}: table '{key}' must have {d} columns like "
                                     f"'word', got shape {table.shape}")
                self.params[key] = table
        for key in self.params:
            self.param_kinds[key] = "embedding"
        if pad_id is not None:
            pad_id = check_int(pad_id, label, "pad_id")
            if not 0 <= pad_id < word.shape[0]:
                raise ValueError(f"{label}: pad_id must be a token id in [0, {word.shape[0]}), "
                                 f"got {pad_id!r}")
        self.pad_id = pad_id
        self.mask = None if mask is None else check_mask(mask, label)

    @property
    def in_features(self) -> None:
        return None

    def out_features(self, in_features: int | None) -> int:
        return int(self.params["word"].shape[1])

    def config(self) -> dict[str, object]:
        return {"pad_id": self.pad_id, "mask": self.mask}

    def batch_slice(self, rows: slice) -> Embedding:
        return self if self.mask is None else self.with_mask(self.mask[rows])

    # ----------------------------------------------------------------- helpers
    def _label(self) -> str:
        return f"Embedding {self.name!r}" if self.name else "Embedding"

    def _ids(self, x: Array) -> Array:
        """Validated integer ids ``(batch, tokens)``, or ``(S, batch, tokens)`` when a pass
        runs samples side by side (the ids are then the same in every sample)."""
        ids = np.asarray(x)
        vocab = self.params["word"].shape[0]
        if ids.ndim not in (2, 3):
            raise ValueError(f"{self._label()}: expects token ids of shape (batch, tokens), "
                             f"got {ids.shape}")
        as_int = np.rint(ids)
        if not np.array_equal(as_int, ids) or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"{self._label()}: token ids must be integers in [0, {vocab}), "
                             f"got values in [{ids.min()}, {ids.max()}]")
        tokens = ids.shape[-1]
        if "position" in self.params and tokens > self.params["position"].shape[0]:
            raise ValueError(f"{self._label()}: {tokens} tokens, but the position table has "
                             f"{self.params['position'].shape[0]} rows")
        if self.pad_id is not None:
            if self.mask is not None and ids.shape[-2:] != self.mask.shape:
                raise ValueError(f"{self._label()}: the padding mask has shape {self.mask.shape}"
                                 f" (batch, tokens) but the ids have shape {ids.shape}; make "
                                 f"the mask from these ids: errprop.mask_padding(net, ids != "
                                 f"{self.pad_id})")
            real = as_int != self.pad_id
            expected = np.ones(ids.shape[-2:], bool) if self.mask is None else self.mask
            if real.shape[-2:] != expected.shape or not np.all(real == expected):
                raise ValueError(
                    f"{self._label()}: the ids hold padding (id {self.pad_id}) where the "
                    f"padding mask does not say so; attention would see the padded tokens. "
                    f"Apply errprop.mask_padding(net, ids != {self.pad_id}) first")
        return as_int.astype(np.intp)

    @staticmethod
    def _lookup(ids: Array, word: Array | None, position: Array | None,
                token_type: Array | None, d: int) -> Array:
        """The lookup in (possibly sampled or tangent) tables; a None table adds nothing.

        A table with one more axis than its base (``(S, rows, d)``) pairs its leading axis
        with that of ids ``(S, batch, tokens)``, or, for ids ``(batch, tokens)``, adds it:
        either way the result is ``(S, batch, tokens, d)``.
        """
        lead = next((t.shape[0] for t in (word, position, token_type)
                     if t is not None and t.ndim == 3), None)
        shape = (*ids.shape, d)
        if lead is not None and ids.ndim == 2:
            shape = (lead, *shape)
        out = np.zeros(shape)
        tokens = ids.shape[-1]
        if word is not None:
            if word.ndim == 3:
                out += word[np.arange(lead)[:, None, None], ids]
            else:
                out += word[ids]
        if position is not None:
            out += position[:, None, :tokens] if position.ndim == 3 else position[:tokens]
        if token_type is not None:
            out += token_type[:, None, None, 0] if token_type.ndim == 3 else token_type[0]
        return out

    def _tables(self, source: Mapping[str, Array]) -> tuple[Array | None, ...]:
        return tuple(source.get(k) for k in ("word", "position", "token_type"))

    # -------------------------------------------------------------------- math
    def forward(self, x: Array, params: Mapping[str, Array] | None = None) -> Array:
        ids = self._ids(x)
        merged = dict(self.params) if params is None else {**self.params, **params}
        return self._lookup(ids, *self._tables(merged), self.params["word"].shape[1])

    def jvp(self, x, y, dx, dparams):
        ids = self._ids(x)
        out = self._lookup(ids, *self._tables(dparams), y.shape[-1])
        lead = () if dx is None else dx.shape[:dx.ndim - x.ndim]
        if out.shape != (*lead, *y.shape) and out.ndim <= len(lead) + y.ndim:
            out = np.broadcast_to(out, (*lead, *y.shape)).copy()
        return out

    def jvp2(self, x, y, a, b, dparams):
        # linear in the tables and constant in the ids: no second-order term
        return self.jvp(x, y, b, {}) if b is not None else np.zeros_like(y)

    def vjp(self, x, y, g, params=()):
        if params:
            raise NotImplementedError(
                f"{self._label()}: exact output statistics of quantized embedding tables "
                f"are not implemented (the per-sample cotangent spans the whole vocabulary); "
                f"use report.node_statistics(probes=...) or monte_carlo")
        return np.zeros((g.shape[0], *x.shape)), {}

    def abs_jvp(self, x, y, r, rparams):
        return np.abs(self.jvp(x, y, None, rparams)) if rparams else np.zeros_like(y)

    def norm_jvp(self, x, y, r, rparams):
        ids = self._ids(x)
        out = np.zeros(ids.shape[0])
        for key, table in zip(("word", "position", "token_type"), self._tables(rparams)):
            if table is not None:
                out += sample_norm(self._lookup(ids, *(table if k == key else None for k in
                                                       ("word", "position", "token_type")),
                                                y.shape[-1]))
        return out

    def describe(self) -> str:
        vocab, d = self.params["word"].shape
        extra = "+".join(k for k in ("position", "token_type") if k in self.params)
        return f"vocab={vocab}, d={d}" + (f", +{extra}" if extra else "")
