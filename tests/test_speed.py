"""Absorbed decoding on the latent cache (padding, batches, several steps) and ``mla bench`` (not timed: it only has
to run and report consistent sizes; speed ratios are measured by the benchmark itself)."""

import json
import statistics
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import convert_tiny

TOL = 1e-4  # fp32 logits


@pytest.fixture(scope="module")
def half(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "half"
    convert_tiny(tiny_models["llama-gqa"], out, kv_budget=0.5)
    return out


def _decode(model, ids, mask, steps, absorb):
    """Prefill the left-padded batch, then ``steps`` greedy steps on the cache; the logits of every step."""
    model.config.absorb = absorb
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits, 1), mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_absorbed_decode_with_padding_equals_decompressed(half, attn):
    model = AutoModelForCausalLM.from_pretrained(half, trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[2, :7] = 0
    with torch.no_grad():
        absorbed, _ = _decode(model, ids, mask, steps=6, absorb="auto")  # prompt decompressed, steps absorbed
        naive, _ = _decode(model, ids, mask, steps=6, absorb="never")
        always, _ = _decode(model, ids, mask, steps=6, absorb="always")
    assert (absorbed - naive).abs().max().item() < TOL
    assert (always - naive).abs().max().item() < TOL
    # padded rows decode as they do alone
    with torch.no_grad():
        alone, _ = _decode(model, ids[2:, 7:], mask[2:, 7:], steps=6, absorb="auto")
    assert (alone[0] - absorbed[2]).abs().max().item() < TOL


def test_mla_bench_reports_sizes_and_ratios(tiny_models, half, tmp_path, capsys):
    from convert.cli import main

    out = tmp_path / "bench.json"
    started = time.monotonic()
    assert main(["bench", str(half), "--baseline", str(tiny_models["llama-gqa"]), "--batch", "2", "--context", "24",
                 "--new-tokens", "4", "--runs", "2", "--json", str(out)]) == 0
    wall = time.monotonic() - started
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("half: decode ")
    assert "÷ original" in printed
    res = json.loads(out.read_text())
    original, mla = res["models"]
    assert len(mla["decode_runs_s"]) == 2  # --runs 2
    for row in (original, mla):  # throughput from the command's sizes (2 x 24 prompt, 4 new tokens) and the times
        assert row["decode_tok_s"] == pytest.approx(2 * 4 / statistics.median(row["decode_runs_s"]))
        assert row["prefill_tok_s"] == pytest.approx(2 * 24 / row["prefill_s"])
        assert 0 < row["prefill_s"] and 0 < min(row["decode_runs_s"]) and row["prefill_s"] + sum(row["decode_runs_s"]) < wall
    record = json.loads((half / "mla_conversion.json").read_text())["kv_cache"]
    assert mla["kv_bytes_per_token"] == record["mla_bytes_per_token"]
    assert original["kv_bytes_per_token"] == record["original_bytes_per_token"]
    assert mla["vs_original"]["kv_cache_mib"] == pytest.approx(record["ratio"])
    assert mla["device"] == "cpu" and mla["dtype"] == "float32"
    assert all(row["peak_memory_mib"] >= row["weights_mib"] for row in (original, mla))  # the weights are resident


def test_mla_bench_errors(half, tmp_path, capsys):
    from convert.cli import main

    for args, message in [([str(half), "--batch", "0"], "--batch"),
                          ([str(tmp_path / "missing")], "missing"),
                          ([str(half), "--attn", "flash"], "--attn")]:
        assert main(["bench", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_latent_layer_grows_crops_and_reorders_like_a_dynamic_layer():
    """MLALatentLayer keeps [ckv | kpe] in one growing buffer; it must hold exactly what DynamicLayer would."""
    from transformers.cache_utils import DynamicLayer

    from mla_modeling.modeling_mla import MLALatentLayer

    g = torch.Generator().manual_seed(0)
    ours, ref = MLALatentLayer(), DynamicLayer()

    def step(t, batch=3):
        k, v = torch.randn(batch, 1, t, 5, generator=g), torch.randn(batch, 1, t, 2, generator=g)
        a, b = ours.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(ours.latent, torch.cat(b, dim=-1))

    step(7)
    for _ in range(300):  # past the first buffer's slack: it has to grow and keep the contents
        step(1)
    for layer in (ours, ref):
        layer.crop(-5)
    step(2)
    for layer in (ours, ref):
        layer.batch_select_indices(torch.tensor([2, 0]))
    step(1, batch=2)
    assert ours.get_seq_length() == ref.get_seq_length() == 305


def test_decode_after_crop_matches_a_full_forward(half):
    model = AutoModelForCausalLM.from_pretrained(half, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :8], use_cache=True).past_key_values
        for t in range(8, 12):
            model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache.crop(-3)  # keep 9 tokens, then continue with different ones
        steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in (12, 13)]
        full = model(input_ids=torch.cat((ids[:, :9], ids[:, 12:14]), 1), use_cache=False).logits[:, -2:]
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


def test_absorbed_weight_cache_follows_weight_changes_and_gradients(half):
    model = AutoModelForCausalLM.from_pretrained(half, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(2))

    def both():
        with torch.no_grad():
            model.config.absorb = "always"
            a = model(input_ids=ids).logits
            model.config.absorb = "never"
            return a, model(input_ids=ids).logits

    a, n = both()
    assert (a - n).abs().max().item() < TOL
    with torch.no_grad():  # an in-place update (as an optimizer step does) must not leave stale absorbed weights
        for layer in model.model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(1.5)
    a2, n2 = both()
    assert (a2 - n2).abs().max().item() < TOL and (a2 - a).abs().max().item() > 1e-3
    model.config.absorb = "always"
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
