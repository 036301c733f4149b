"""GGML block types filled from itera's own codes: bit-exact against gguf's dequantizer, GPTQ with
every type, checkpoints that store blocks, and GGUF files that carry them unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_itera
from itera.storage.ggml import TYPES
from itera.quant.gptq import gptq


def _weights(rows: int = 6, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1] = 0  # an all-zero row
    w[2] = 0.01  # a constant row
    w[3] = torch.rand(cols, generator=g) * 0.1  # all positive
    w[4, :16] *= 50  # outliers
    return w


@pytest.mark.parametrize("name", list(TYPES))
def test_blocks_decode_to_our_weights_in_gguf(name):
    """Every type's bytes, read by the gguf package's own dequantizer, give exactly the weights
    itera computes with, with and without importance data."""
    import gguf

    t, w = TYPES[name], _weights()
    for importance in (None, torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) ** 2):
        u, a, b = t.quantize(w, importance)
        blocks = t.encode(u, a, b)
        assert blocks.dtype == np.uint8 and blocks.shape == (6, 512 // t.block * t.nbytes)
        assert gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, name)] == (t.block, t.nbytes)
        theirs = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, name))
        assert np.array_equal(theirs, t.expand(u, a, b).numpy()), name
        assert torch.equal(t.expand(u, a, b)[1], torch.zeros(512))  # zero stays zero


@pytest.mark.parametrize("name,max_rel_err", [("Q2_K", 0.35), ("Q3_K", 0.16), ("IQ4_XS", 0.09), ("Q4_0", 0.1),
                                              ("IQ4_NL", 0.09), ("Q4_K", 0.1), ("Q4_1", 0.1), ("Q5_0", 0.06),
                                              ("Q5_K", 0.05), ("Q5_1", 0.05), ("Q6_K", 0.02), ("Q8_0", 0.007)])
def test_error_shrinks_with_the_bits(name, max_rel_err):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    t = TYPES[name]
    err = ((t.expand(*t.quantize(w)) - w).norm() / w.norm()).item()
    assert err < max_rel_err, err


def test_importance_lowers_the_weighted_error():
    """Columns that matter (large mean square of their input) get smaller errors when the search
    is told which they are: the weighted error falls for every type."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    imp = torch.ones(512)
    imp[::7] = 50.0
    for name, t in TYPES.items():
        def weighted(importance):
            return ((t.expand(*t.quantize(w, importance)) - w) ** 2 * imp).sum().item()

        assert weighted(imp) < weighted(None), name


@pytest.mark.parametrize("name", ["IQ4_NL", "Q4_0", "Q6_K"])
def test_codes_are_the_nearest_grid_value_the_lower_at_a_tie(name):
    """codes() (a table for non-uniform grids, rounding for uniform ones) against a search of
    the grid, on values spread past both ends and on every midpoint exactly."""
    t = TYPES[name]
    grid = torch.tensor(t.grid, dtype=torch.float32)
    x = torch.cat([torch.linspace(grid[0] - 20, grid[-1] + 20, 20001), (grid[1:] + grid[:-1]) / 2])
    want = (x[:, None] - grid).abs().argmin(1)  # argmin takes the first (lower) of equal distances
    got = t.codes(x[None, :], torch.ones(1, 1), torch.zeros(1, 1))[0]
    if t.uniform:  # rounding goes half to even, so only off the midpoints is the grid's answer asked of it
        keep = (x - x.floor()) != 0.5
        want, got = want[keep], got[keep]
    assert torch.equal(got.long(), want)


def test_a_matrix_quantizes_the_same_whole_and_in_pieces_of_rows():
    """The parameter search works through rows a piece at a time; a row's result is its own."""
    w = torch.randn(300, 2048, generator=torch.Generator().manual_seed(5)) * 0.05
    for name in ("Q4_K", "IQ4_XS", "Q8_0"):
        t = TYPES[name]
        whole = t.quantize(w)
        parts = [t.quantize(w[r:r + 37]) for r in range(0, 300, 37)]
        for i in range(3):
            assert torch.equal(whole[i], torch.cat([p[i] for p in parts])), name


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q6_K"])
def test_gptq_with_a_ggml_type_beats_its_rounding_on_a_known_hessian(name):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.1 + torch.eye(256))
    w = torch.randn(64, 256, generator=g) * 0.05
    h = x.T @ x / x.shape[0]
    t = TYPES[name]

    def out_err(u, a, b):
        return ((x @ (w - t.expand(u.long(), a, b)).T) ** 2).mean().item()

    u, a, b = gptq(w, h, t)
    assert out_err(u, a, b) < 0.85 * out_err(*t.quantize(w, torch.diag(h)))
    blocks = t.encode(u, a, b)  # GPTQ's codes and parameters are the type's: they encode exactly
    assert torch.equal(t.decode(blocks, 64, 256), t.expand(u.long(), a, b))


# ------------------------------------------------------------------------------- checkpoints and files


def test_gguf_type_checkpoint_round_trips_and_exports_its_blocks_unchanged(wide_lm, tmp_path):
    """--gguf-type Q4_K stores Q4_K blocks; the checkpoint loads back to the same logits as in memory,
    and `itera export --format gguf` writes exactly those bytes (rows of q/k permuted for llama.cpp)."""
    import gguf
    from safetensors.torch import load_file

    from itera.storage.names import gguf_name, rope_permutation
    from itera.model.checkpoint import load_model
    from itera.jobs.quantize import QuantizeOptions, quantize_in_memory

    out = tmp_path / "q4k"
    opts = QuantizeOptions(model=wide_lm, out=out, method="gptq", gguf_type="Q4_K", calib="pydocs@train",
                           calib_samples=8, calib_seqlen=64, eval_tokens=200, quantize_embeddings=True)
    outcome, mem = quantize_in_memory(opts)
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert all(v == {"gguf_type": "Q4_K"} for v in layers.values())
    assert "model.embed_tokens" in layers and "lm_head" in layers
    loaded, cfg = load_model(out)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(mem(x), loaded(x))
    rec = run_itera("export", "--model", out, "--format", "gguf", "--out", tmp_path / "q4k.gguf").record
    assert rec["params"]["gguf_type"] == "AUTO" and rec["metrics"]["verified"]
    assert rec["metrics"]["file_bytes"] == (tmp_path / "q4k.gguf").stat().st_size == outcome.metrics["gguf_bytes"]
    stored = load_file(str(out / "model.safetensors"))
    written = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q4k.gguf")).tensors}
    perm = rope_permutation(cfg.num_attention_heads, cfg.head_dim)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        t = written[gguf_name(module + ".weight")]
        assert t.tensor_type.name == "Q4_K"
        want = stored[module + ".ggml"]
        want = want[perm] if module.endswith("q_proj") else want
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want.numpy()), module


def test_inputs_are_rounded_as_llama_cpp_rounds_them():
    """The GGUF verification's reference rounds each product's input as llama.cpp's CPU backend
    does: 8-bit blocks of 32 for Q4_0-family weights (exactly gguf's Q8_0 round trip), float16
    for F16 weights, 8-bit blocks of 256 (scale from the value of largest magnitude) for K-quants."""
    import gguf

    from itera.storage.ggml import input_as_llama_cpp

    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 3
    x[0, :32] = 0  # an all-zero block stays zero
    q8 = gguf.GGMLQuantizationType.Q8_0
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, q8), q8)
    for t in ("Q4_0", "Q5_1", "Q8_0", "IQ4_NL"):
        assert np.array_equal(input_as_llama_cpp(torch.from_numpy(x), t).numpy(), ref)
    assert np.array_equal(input_as_llama_cpp(torch.from_numpy(x), "F16").numpy(), x.astype(np.float16).astype(np.float32))
    k = input_as_llama_cpp(torch.from_numpy(x), "Q4_K").numpy().reshape(8, 2, 256)
    blocks = x.reshape(8, 2, 256)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    assert np.allclose(k, np.round(blocks * (-127 / m)) / (-127 / m), rtol=1e-6, atol=0)
    assert len(np.unique(k[1, 0])) <= 255 and np.array_equal(input_as_llama_cpp(torch.from_numpy(x), "F32").numpy(), x)
