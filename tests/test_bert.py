"""all-MiniLM-L6-v2 (a real trained BERT) loaded from safetensors, against PyTorch.

The reference is the model written out in plain torch ops in this file (embedding
lookup, F.layer_norm, F.linear, additive padding mask with finfo.min as Hugging Face
does, F.gelu, masked mean pooling, F.normalize); it shares nothing with errprop's code.
"""

import json

import numpy as np
import pytest

import errprop as ep

SENTENCES = ["A man is eating food.", "A man is riding a horse.",
             "The quick brown fox jumps over the lazy dog by the river bank.", "Hi"]


def torch_minilm(torch, folder, ids, mask, dtype):
    F = torch.nn.functional
    from safetensors.torch import load_file
    w = {k: v.to(dtype) for k, v in load_file(str(folder / "model.safetensors")).items()
         if k != "embeddings.position_ids"}
    cfg = json.loads((folder / "config.json").read_text())
    H, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    m = torch.as_tensor(mask, dtype=dtype)
    B, T = ids_t.shape
    e = "embeddings."
    x = (w[e + "word_embeddings.weight"][ids_t] + w[e + "position_embeddings.weight"][:T]
         + w[e + "token_type_embeddings.weight"][0])
    x = F.layer_norm(x, x.shape[-1:], w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"], eps)
    additive = (1.0 - m)[:, None, None, :] * torch.finfo(dtype).min
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(k, t):
            return F.linear(t, w[p + k + ".weight"], w[p + k + ".bias"])

        q, k, v = (lin(f"attention.self.{n}", x).view(B, T, H, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + additive
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = F.layer_norm(x + lin("attention.output.dense", o), x.shape[-1:],
                         w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], eps)
        h = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
        x = F.layer_norm(x + h, x.shape[-1:], w[p + "output.LayerNorm.weight"],
                         w[p + "output.LayerNorm.bias"], eps)
    pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    return F.normalize(pooled, p=2, dim=1).numpy()


@pytest.fixture(scope="module")
def bert(minilm):
    net = ep.load(minilm)
    masked, ids = ep.encode(net, minilm, SENTENCES)
    return net, masked, ids


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-10)])
def test_minilm_matches_pytorch(bert, minilm, torch, dtype, rtol):
    _, masked, ids = bert
    _, mask = ep.tokenize(minilm, SENTENCES)
    want = torch_minilm(torch, minilm, ids, mask, getattr(torch, dtype))
    got = masked(ids)
    assert got.shape == (len(SENTENCES), 384)
    assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want))


def test_padding_does_not_change_a_sentence(bert, minilm):
    """Each sentence alone (no padding) embeds exactly as inside the padded batch."""
    net, masked, ids = bert
    batch = masked(ids)
    for i, sentence in enumerate(SENTENCES):
        alone, one = ep.encode(net, minilm, [sentence])
        np.testing.assert_allclose(alone(one)[0], batch[i], rtol=0, atol=1e-12)


def test_tokenizer_pads_to_the_longest_and_truncates(minilm):
    ids, mask = ep.tokenize(minilm, SENTENCES)
    lengths = mask.sum(axis=1)
    assert ids.shape[1] == lengths.max() < 128  # not the file's fixed 128
    assert np.all(ids[~mask] == 0) and np.all(ids[mask] != 0)
    assert np.all(ids[:, 0] == 101)  # [CLS]
    ids, mask = ep.tokenize(minilm, ["word " * 500], max_length=16)
    assert ids.shape == (1, 16) and mask.all() and ids[0, -1] == 102  # [SEP] kept


def test_unmasked_padded_batch_is_refused(bert, minilm):
    net, _, ids = bert
    with pytest.raises(ValueError, match="mask_padding"):
        net(ids)
    masked_for_other_batch, _ = ep.encode(net, minilm, SENTENCES[:2])
    with pytest.raises(ValueError, match="padding"):
        masked_for_other_batch(ids)


def test_loader_options_and_errors(minilm, tmp_path):
    tokens = ep.load_bert(minilm, pooling=None, layers=2)
    ids, _ = ep.tokenize(minilm, ["A man is eating food."])
    assert tokens(ids).shape == (1, ids.shape[1], 384)
    assert [n for n, _ in tokens.layers()][-1] == "layer1.ln2"
    with pytest.raises(ValueError, match="layers"):
        ep.load_bert(minilm, layers=7)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        ep.load(tmp_path)
    with pytest.raises(ValueError, match="neither"):
        ep.load(tmp_path.parent)


def test_per_tensor_8bit_weights_show_their_outlier_layers(minilm):
    """Per-tensor 8-bit weights lose tens of dB on MiniLM; per-channel keeps them. The
    source table names the culprit: low tensor SQNR, huge max/RMS, largest output share.
    (First two layers, to keep the test quick; layer0.fc2 holds the worst outliers.)"""
    net, ids = ep.encode(ep.load_bert(minilm, layers=2), minilm, SENTENCES)
    reports = {g: ep.analyze(net, ids, ep.QuantConfig(weights=ep.Uniform(8, granularity=g)))
               for g in ("tensor", "channel")}
    assert reports["channel"].sqnr_db > reports["tensor"].sqnr_db + 10
    worst = min(reports["tensor"].sources.values(), key=lambda s: s.sqnr_db)
    assert worst.max_to_rms > 50
    top = reports["tensor"].source_table().splitlines()[2].split()[0]
    assert top == worst.name
    # the per-tensor weight SQNR recomputed by hand (symmetric, restricted range ±127)
    W = net[worst.source.layer].params[worst.source.param]
    s = np.max(np.abs(W)) / 127
    err = np.clip(np.round(W / s), -127, 127) * s - W
    want = 20 * np.log10(np.linalg.norm(W) / np.linalg.norm(err))
    assert abs(worst.sqnr_db - want) < 0.01
