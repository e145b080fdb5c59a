"""The DeepSeek-V3 serving format (issue 15, first part): one of our MLA models under the format's constraints
(uniform ranks, every c-th RoPE frequency, a latent norm) equals stock ``DeepseekV3ForCausalLM`` on the mapped
weights; what the format cannot express is a one-line MLAError."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from convert.deepseek import deepseek_v3_tensors
from convert.errors import MLAError
from mla_modeling.configuration_mla import MLAConfig
from mla_modeling.modeling_mla import MLAForCausalLM

TOL = 1e-4  # fp32 logits


def _mla(**overrides) -> MLAForCausalLM:
    """A tiny random MLA model (head_dim 16: RoPE width 8 keeps source frequencies 0, 2, 4, 6 of 8)."""
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=16, rope_freq_indices=[[0, 2, 4, 6]] * 2, kv_a_layernorm=True, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
              max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(0)
    model = MLAForCausalLM(MLAConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "q_proj" in name or "kv_a_proj" in name:
                p.mul_(8.0)
    return model


def test_mla_with_format_constraints_equals_stock_deepseek_v3():
    mla = _mla()
    config, tensors = deepseek_v3_tensors(mla.config, mla.state_dict())
    assert config.model_type == "deepseek_v3" and config.q_lora_rank is None
    assert config.first_k_dense_replace == 2 and config.num_key_value_heads == 4 and not config.tie_word_embeddings
    ds = DeepseekV3ForCausalLM(config).eval()
    ds.load_state_dict(tensors, strict=True)  # every tensor name and shape as the stock model has them
    ids = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = mla(ids).logits, ds(ids).logits
        # decoding on the stock model's own latent cache gives the same logits too
        out = ds(ids[:, :30], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(30, 40):
            out = ds(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert (ref - got).abs().max().item() < TOL
    assert (torch.cat(steps, 1) - ref).abs().max().item() < TOL


@pytest.mark.parametrize("overrides, words", [
    ({"kv_a_layernorm": False}, "latent"),
    ({"kv_lora_rank": [12, 10]}, "one kv_lora_rank"),
    ({"rope_freq_indices": [[0, 1, 2, 3]] * 2}, "every 2-th"),
    ({"qk_rope_head_dim": 6, "rope_freq_indices": [[0, 2, 4]] * 2}, "dividing head_dim"),
    ({"attention_bias": True}, "attention biases"),
    ({"qk_norm": "head"}, "QK-norm"),
    ({"final_logit_softcapping": 30.0}, "soft caps"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "plain RoPE"),
])
def test_what_the_format_cannot_express_is_named(overrides, words):
    mla = _mla(**overrides)
    with pytest.raises(MLAError, match=words):
        deepseek_v3_tensors(mla.config, mla.state_dict())
