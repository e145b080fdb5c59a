"""The conversion's maths against references written here: calibration statistics from one full forward and
backward pass of the source, the RoPE split's per-frequency PCA and selection from their definitions, and the
allocations by their optimality conditions (tools/mutants.py breaks each of these and checks that a test fails)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import calibrate_tiny
from convert.allocate import allocate_ranks, allocate_ropes
from convert.assemble import rope_theta
from convert.ropesplit import component_scores, rope_split

SPAN = 64


SOURCE = "llama-bias"  # GQA with biases on q, k, v and o


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    return calibrate_tiny(tiny_models[SOURCE], tmp_path_factory.mktemp("spill"))


def _reference_statistics(src, windows):
    """Per layer ``{name: tensor}``: the statistics of ``calibrate.LayerStats`` from their definitions, on one
    forward and backward pass of the whole source model (transformers' own modules, the loss summed over tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    seen = []
    for layer in model.model.layers:
        attn, out = layer.self_attn, {}

        def keep(name, out=out):
            def hook(module, args, output):
                if name == "k":
                    out["x"] = args[0].detach()
                output.retain_grad()
                out[name] = output
            return hook

        for name, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
            proj.register_forward_hook(keep(name))
        seen.append(out)
    logits = model(windows, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    refs = []
    for out in seen:
        flat = {n: t.detach().reshape(-1, t.shape[-1]).double() for n, t in out.items() if n != "x"}
        grads = {n: out[n].grad.reshape(-1, out[n].shape[-1]).double() for n in ("k", "v")}
        x = out["x"].reshape(-1, out["x"].shape[-1]).double()
        n_tok = x.shape[0]
        y = torch.cat((flat["k"], flat["v"]), 1)
        ref = {"cov": y.T @ y / n_tok, "q_energy": (flat["q"] ** 2).mean(0)}
        x_norm2 = (x**2).sum(1) + 1.0  # |[x; 1]|^2
        for n, g in grads.items():
            w = (g**2).sum(1)
            unit = g / w.sqrt().clamp_min(1e-15)[:, None]
            ref[f"grad_{n}"] = unit.T @ unit / n_tok
            ref[f"cov_{n}"] = (y * w[:, None]).T @ y / n_tok
            ref[f"trace_{n}"] = float((w * x_norm2).sum()) / n_tok
        refs.append(ref)
    return refs


def test_calibration_statistics_equal_a_full_backward_pass(calibrated, tiny_models):
    """The layer-by-layer sweep (two batches, each layer recomputed in the reverse sweep) gives the moments,
    gradient directions and gradient-weighted moments of one backward pass of the whole model."""
    reader, layout, stats, windows = calibrated
    refs = _reference_statistics(tiny_models[SOURCE], windows)
    for st, ref in zip(stats, refs):
        for name, expected in ref.items():
            got = getattr(st, name)
            if isinstance(expected, float):
                assert got == pytest.approx(expected, rel=1e-4), name
            else:
                err = float((got - expected).abs().max() / expected.abs().max())
                assert err < 1e-4, (name, err)


def _spin(theta: float, span: int) -> float:
    """Mean of ``1 - cos(theta * delta)`` over delta in [0, span], by the trapezoidal rule."""
    delta = torch.linspace(0, span, 20001, dtype=torch.float64)
    return float(torch.trapezoid(1 - torch.cos(theta * delta), delta)) / span


@pytest.mark.parametrize("layer", [0, 1])
def test_rope_rotation_is_the_per_frequency_pca_and_scores_follow_their_definition(calibrated, layer):
    """``rotate``: for each frequency the rotation diagonalises the gradient-weighted key moments of that
    frequency (real and imaginary parts together), components in descending order; each score is the mean of
    ``1 - cos`` over the span times the component's weighted energy times its gradient share / 2."""
    reader, layout, stats, _ = calibrated
    st, g, d_h = stats[layer], layout.num_kv_heads, layout.head_dim
    theta = rope_theta(layout, layer)
    rotations, scores = component_scores(st, g, d_h, layout.num_heads, "rotate", theta, SPAN)
    half = d_h // 2
    for i in range(half):
        re = [j * d_h + i for j in range(g)]
        im = [j * d_h + i + half for j in range(g)]
        c_i = st.cov_k[re][:, re] + st.cov_k[im][:, im]
        g_i = st.grad_k[re][:, re] + st.grad_k[im][:, im]
        u = rotations[i]
        assert torch.allclose(u @ u.T, torch.eye(g, dtype=torch.float64), atol=1e-12)
        moments = u @ c_i @ u.T
        energy = torch.diagonal(moments)
        assert (moments - torch.diag(energy)).abs().max() < 1e-9 * energy.abs().max()
        assert torch.all(energy[:-1] >= energy[1:])
        expected = _spin(theta[i], SPAN) * energy * torch.diagonal(u @ g_i @ u.T) / 2
        assert torch.allclose(scores[i], expected, rtol=1e-6, atol=0), (i, scores[i], expected)


@pytest.mark.parametrize("d_rope", [4, 10, 24])
def test_rope_split_keeps_the_best_scoring_components(calibrated, d_rope):
    """The first ``d_rope / 2`` rows of the rotation are the real parts of the ``d_rope / 2`` best-scoring
    rotated components (over all frequencies), each the component's own row of its frequency's rotation."""
    reader, layout, stats, _ = calibrated
    g, d_h = layout.num_kv_heads, layout.head_dim
    theta = rope_theta(layout, 0)
    rotations, scores = component_scores(stats[0], g, d_h, layout.num_heads, "rotate", theta, SPAN)
    split = rope_split(stats[0], g, d_h, layout.num_heads, d_rope, "rotate", theta, SPAN)
    order = torch.argsort(scores.flatten(), descending=True)[: d_rope // 2]
    best = sorted((int(t) // g, int(t) % g) for t in order)
    assert split.freq_index == [i for i, _ in best]
    for row, (i, c) in zip(split.rotation[: d_rope // 2], best):
        re = [j * d_h + i for j in range(g)]
        assert torch.equal(row[re], rotations[i][c])
        assert row.abs().sum() == pytest.approx(row[re].abs().sum())


def _kept_pairs(rows: torch.Tensor, head_dim: int) -> list[tuple[int, torch.Tensor]]:
    """``(frequency, row)`` of each kept RoPE row (real parts): its nonzero entries all sit on one frequency."""
    out = []
    for row in rows:
        cols = torch.nonzero(row.abs() > 1e-12).flatten()
        freqs = {int(c) % head_dim for c in cols}
        assert len(freqs) == 1 and min(freqs) < head_dim // 2
        out.append((freqs.pop(), row))
    return out


@pytest.mark.parametrize("method", ["rotate-norm", "norm", "high", "uniform"])
def test_other_rope_selections_follow_their_definitions(calibrated, method):
    """RoPE width 8 over 2 KV heads of 8 frequencies. ``rotate-norm``: the per-frequency PCA of the plain key
    moments, the 4 components with the largest ``sqrt(E[k_c^2] * E[q^2])`` over all frequencies (queries summed
    over the group's heads and the pair's two dims); ``norm``: no rotation, each KV head its 2 pairs with the
    largest such score; ``high``: each head its 2 fastest frequencies (0 and 1); ``uniform``: each head 2 evenly
    spaced ones (0 and 4)."""
    reader, layout, stats, _ = calibrated
    g, d_h, n_h = layout.num_kv_heads, layout.head_dim, layout.num_heads
    half, group, d_rope = d_h // 2, n_h // g, 8
    # query energies spread over three decades, so that they (not only the keys) decide the selections
    spread = 10 ** (3 * torch.rand(n_h * d_h, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    st = dataclasses.replace(stats[0], q_energy=stats[0].q_energy * spread)
    split = rope_split(st, g, d_h, n_h, d_rope, method, rope_theta(layout, 0), SPAN)
    kept = _kept_pairs(split.rotation[: d_rope // 2], d_h)
    q_group = torch.zeros(half, g, dtype=torch.float64)  # E[q^2] of frequency i summed over group j's heads
    for h in range(n_h):
        q_group[:, h // group] += st.q_energy[h * d_h : h * d_h + half] + st.q_energy[h * d_h + half : (h + 1) * d_h]
    cov = st.cov[: g * d_h, : g * d_h]
    if method == "rotate-norm":
        candidates = []
        for i in range(half):
            re, im = [j * d_h + i for j in range(g)], [j * d_h + i + half for j in range(g)]
            evals, evecs = torch.linalg.eigh(cov[re][:, re] + cov[im][:, im])
            for c in range(g):
                score = float((evals[c] * (evecs[:, c] ** 2 @ q_group[i])).sqrt())
                candidates.append((score, i, evecs[:, c]))
        best = sorted(candidates, key=lambda t: t[0], reverse=True)[: d_rope // 2]
        assert sorted(i for _, i, _ in best) == sorted(i for i, _ in kept)
        for _, i, vec in best:
            rows = [row[[j * d_h + i for j in range(g)]] for f, row in kept if f == i]
            assert max(abs(float(row @ vec)) for row in rows) == pytest.approx(1.0, abs=1e-9)
        return
    got = sorted((int(torch.nonzero(row).flatten()[0]) // d_h, i) for i, row in kept)  # (head, frequency)
    per_head = d_rope // 2 // g
    if method == "norm":
        expected = []
        for c in range(g):
            k_e = torch.tensor([float(cov[c * d_h + i, c * d_h + i] + cov[c * d_h + i + half, c * d_h + i + half])
                                for i in range(half)], dtype=torch.float64)
            score = (k_e * q_group[:, c]).sqrt()
            expected += [(c, int(i)) for i in torch.argsort(score, descending=True)[:per_head]]
    else:
        expected = [(c, i) for c in range(g) for i in ((0, 1) if method == "high" else (0, 4))]
    assert got == sorted(expected)


def test_rank_allocation_drops_the_smallest_eigenvalues():
    """Latent ranks over layers: the floor everywhere, the total exact, and no layer drops an eigenvalue larger
    than one another layer keeps above its floor (the optimality condition of keeping the largest ones)."""
    gen = torch.Generator().manual_seed(0)
    spectra = [torch.rand(40, generator=gen, dtype=torch.float64).pow(4).sort(descending=True).values * s
               for s in (1.0, 3.0, 0.2, 1.5)]
    ropes, total, floor = [8, 6, 4, 10], 24, 4
    ranks = allocate_ranks(spectra, ropes, total, floor)
    assert sum(ranks) + sum(ropes) == total * len(spectra) and min(ranks) >= floor
    kept_min = min(float(sp[r - 1]) for sp, r in zip(spectra, ranks) if r > floor)
    dropped_max = max(float(sp[r]) for sp, r in zip(spectra, ranks))
    assert kept_min >= dropped_max


@pytest.mark.parametrize("scales,outlier", [((1.0, 4.0, 0.5), False), ((1.0, 1.0, 1.0), True)])
def test_rope_allocation_keeps_the_best_components_over_layers(scales, outlier):
    """RoPE widths over layers: ``n * d_rope / 2`` components keep RoPE in all, and none dropped scores higher
    than one kept (``outlier``: the single best component lies in layer 0, most of the next in other layers)."""
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(8, 2, generator=gen, dtype=torch.float64) * s for s in scales]
    if outlier:
        scores[0] = scores[0] * 0.1
        scores[0][3, 1] = 10.0
    d_rope = 6
    ropes = allocate_ropes(scores, d_rope)
    assert sum(ropes) == len(scores) * d_rope and all(r % 2 == 0 for r in ropes)
    ordered = [sc.flatten().sort(descending=True).values for sc in scores]
    kept_min = min(float(o[r // 2 - 1]) for o, r in zip(ordered, ropes) if r)
    dropped_max = max(float(o[r // 2]) for o, r in zip(ordered, ropes) if r // 2 < len(o))
    assert kept_min >= dropped_max


def test_rope_removal_is_exact_at_distance_zero(tmp_path):
    """A YaRN source (attention scaling s = 1.139 on cos and sin) converted with 8 of 32 RoPE dims kept and a
    latent of full rank: the only approximation left is the RoPE the other pairs lost, which is exact when every
    token sits at the same position (the rotation between any two is the identity, the scaling s^2 carried by the
    no-RoPE query rows). The logits then equal the source's."""
    from transformers import AutoModelForCausalLM

    from conftest import VOCAB, convert_tiny, make_tiny

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    make_tiny(tmp_path / "src", "llama-gqa", rope_parameters=yarn, rope_theta=None)
    convert_tiny(tmp_path / "src", tmp_path / "mla", kv_lora_rank=56, rope_dim=8)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    position_ids = torch.full_like(ids, 5)
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "mla", trust_remote_code=True, dtype=torch.float32).eval()
    mask = torch.ones_like(ids)  # with a mask given, equal position ids do not read as packed sequences
    with torch.no_grad():
        expected = source(ids, attention_mask=mask, position_ids=position_ids).logits
        got = export(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        moved = export(ids, use_cache=False).logits  # positions 0..11: inexact, so the check above is not vacuous
    assert (got - expected).abs().max().item() < 1e-4
    assert (moved - source(ids).logits).abs().max().item() > 1e-3
