"""Conversion methods on tiny models: the RoPE rotation is exact, each factorization is the optimum of its metric
(computed in the test), budgets add up."""

import math

import pytest
import torch

from conftest import assembled_reference_error, calibrate_tiny, convert_tiny, reference_factorization
from convert.allocate import MIN_RANK, check_plan, layer_converter
from convert.assemble import read_attention, rope_theta
from convert.config import ConvertConfig
from convert.factorize import FACTOR_METHODS, LatentStats, joint_latent
from convert.layerwise import Spill
from convert.ropesplit import ROPE_METHODS, rope_split


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    """(reader, layout, stats with gradients) of the tiny GQA llama on a little pydoc text."""
    return calibrate_tiny(tiny_models["llama-gqa"], tmp_path_factory.mktemp("spill"))[:3]


def make_plans(reader, stats, layout, cfg):
    """The plans the converter settles on for ``cfg`` (nothing written)."""
    plans = check_plan(layout, cfg)
    conv = layer_converter(layout, cfg, plans, reader, lambda *a: None, Spill("/nonexistent", float("inf")))
    for i, st in enumerate(stats):
        conv.add(i, st)
    return conv.finish()[0]


def _rope_matrix(dim: int, head_dim: int, pos: int, theta: list[float]) -> torch.Tensor:
    """RoPE at position ``pos`` on ``dim / head_dim`` stacked heads (rotate-half layout) as a matrix."""
    half = head_dim // 2
    mat = torch.zeros(dim, dim, dtype=torch.float64)
    for h in range(dim // head_dim):
        for i in range(half):
            a, b = h * head_dim + i, h * head_dim + i + half
            c, s = math.cos(pos * theta[i]), math.sin(pos * theta[i])
            mat[a, a], mat[a, b], mat[b, a], mat[b, b] = c, -s, s, c
    return mat


@pytest.mark.parametrize("method", ROPE_METHODS)
@pytest.mark.parametrize("d_rope", [0, 8, 20, 32])
def test_rope_split_rotation_is_orthogonal_and_commutes_with_rope(calibrated, method, d_rope):
    """R is orthogonal and maps RoPE on the stacked heads onto RoPE on its own pairs: every q.k is unchanged."""
    reader, layout, stats = calibrated
    g, d_h = layout.num_kv_heads, layout.head_dim
    theta = rope_theta(layout, 0)
    split = rope_split(stats[0], g, d_h, layout.num_heads, d_rope, method, theta, 64)
    rot, dim = split.rotation, g * d_h
    assert torch.allclose(rot @ rot.T, torch.eye(dim, dtype=torch.float64), atol=1e-10)
    assert len(split.freq_index) == d_rope // 2
    # the frequency of every new row: its nonzero entries all sit on one frequency pair
    freq = []
    for row in rot:
        cols = {int(c) % d_h % (d_h // 2) for c in torch.nonzero(row.abs() > 1e-12).flatten()}
        assert len(cols) == 1
        freq.append(cols.pop())
    n = d_rope // 2
    pairs = [(k, n + k) for k in range(n)] + [(d_rope + 2 * j, d_rope + 2 * j + 1) for j in range((dim - d_rope) // 2)]
    assert [freq[a] for a, _ in pairs[:n]] == split.freq_index
    for pos in (1, 7, 50):
        expected = torch.zeros(dim, dim, dtype=torch.float64)
        for a, b in pairs:
            assert freq[a] == freq[b]
            c, s = math.cos(pos * theta[freq[a]]), math.sin(pos * theta[freq[a]])
            expected[a, a], expected[a, b], expected[b, a], expected[b, b] = c, -s, s, c
        assert torch.allclose(rot @ _rope_matrix(dim, d_h, pos, theta) @ rot.T, expected, atol=1e-10)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))


@pytest.mark.parametrize("method", FACTOR_METHODS)
def test_factorization_equals_an_independent_optimum(calibrated, method):
    """At every rank below full the factorization is the optimum of its own metric computed here (whitened SVD,
    least-squares refit); at full rank it is exact."""
    reader, layout, stats = calibrated
    w, st = read_attention(reader, 1, layout), stats[1]
    z = torch.cat((w.k_aug, w.v_aug))  # (D, d+1), D = 64
    n_key = w.k_aug.shape[0]
    zs = LatentStats.of(st, torch.eye(z.shape[0], dtype=torch.float64))
    down, up = joint_latent(z, n_key, z.shape[0], method, zs)
    assert torch.allclose(up @ down, z, atol=1e-12)
    for rank in (4, 16, 32, 48, 63):
        down, up = joint_latent(z, n_key, rank, method, zs)
        assert down.shape == (rank, z.shape[1]) and up.shape == (z.shape[0], rank)
        assert _relative(up @ down, reference_factorization(z, n_key, rank, method, zs)) < 1e-5, rank


@pytest.mark.parametrize("factor", FACTOR_METHODS)
def test_assembled_layers_hold_the_reference_factorization(calibrated, factor):
    """Through the RoPE split and assembly (rank 24, RoPE 8, every layer): each head's no-RoPE key map and value
    map (its rows of kv_b_proj times the latent rows of kv_a_proj_with_mqa) are those of the reference
    factorization of the rotated problem ``[R_nope K; V]``."""
    reader, layout, stats = calibrated
    cfg = ConvertConfig(kv_lora_rank=24, rope_dim=8, factor_method=factor)
    assert assembled_reference_error(reader, layout, stats, cfg) < 1e-5


@pytest.mark.parametrize("alloc", ["fisher", "uniform"])
@pytest.mark.parametrize("rope", ["rotate", "norm"])
@pytest.mark.parametrize("budget", [0.9, 0.5, 0.3125, 0.1875, 0.125])
def test_budget_accounting_is_exact(calibrated, alloc, rope, budget):
    reader, layout, stats = calibrated
    cfg = ConvertConfig(kv_budget=budget, rank_alloc=alloc, rope_method=rope)
    plans = make_plans(reader, stats, layout, cfg)
    kv_dim = layout.num_kv_heads * layout.head_dim
    assert sum(p.rank + p.d_rope for p in plans) == round(budget * 2 * kv_dim) * layout.num_layers
    for p in plans:
        assert p.d_rope % 2 == 0 and 0 <= p.d_rope <= kv_dim
        assert MIN_RANK <= p.rank <= 2 * kv_dim - p.d_rope
    if alloc == "uniform":
        assert len({(p.rank, p.d_rope) for p in plans}) == 1


def test_methods_end_to_end_and_recorded(tiny_models, tmp_path):
    """Every RoPE method x factorization converts, records what it did and stays within the budget; the recorded
    verification is the source's and the export's (loaded as remote code, no cache, decompressed attention) logits
    compared here on the same verification windows."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.data import calibration_data

    src = tiny_models["llama-gqa"]
    settings = dict(calib="pydoc", calib_seqs=4, calib_len=64, verify_seqs=1)  # convert_tiny's
    _, windows = calibration_data(AutoTokenizer.from_pretrained(src), ConvertConfig(**settings), 10**9, str(src))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(windows).logits.log_softmax(-1)
    for rope in ROPE_METHODS:
        for factor in FACTOR_METHODS:
            out = tmp_path / f"{rope}-{factor}"
            rec = convert_tiny(src, out, kv_budget=0.3125, rope_method=rope, factor_method=factor, **settings)
            saved = json.loads((out / "mla_conversion.json").read_text())
            assert saved["method"]["rope"] == rope and saved["method"]["factorization"] == factor
            assert saved["budget"]["achieved_kv_budget"] == pytest.approx(round(0.3125 * 64) / 64)
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
            model.config.absorb = "never"
            with torch.no_grad():
                got = model(windows, use_cache=False).logits.log_softmax(-1)
            kl = float((ref.exp() * (ref - got)).sum(-1).mean())
            agree = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
            assert rec["verify"]["mean_kl"] == pytest.approx(kl, rel=1e-3), (rope, factor)
            assert rec["verify"]["top1_agreement"] == pytest.approx(agree, abs=1.5 / windows.numel())
