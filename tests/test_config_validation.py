"""An export's ``config.json`` is checked when it is read: every field of ``MLAConfig`` that is out of range or of the
wrong type is a ``ValueError`` naming the field, instead of a model that wraps a negative index, truncates a float,
or fails only at its first forward."""

import json

import pytest

from mla_modeling.configuration_mla import MLAConfig

# A valid tiny config: head_dim 16 gives the source 8 RoPE frequencies (indices 0..7).
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, kv_lora_rank=[8, 6], qk_rope_head_dim=[4, 2], qk_nope_head_dim=16,
            v_head_dim=16, rope_freq_indices=[[0, 7], [3]], max_position_embeddings=256)

BAD = [
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"kv_lora_rank": -4}, "kv_lora_rank"),
    ({"kv_lora_rank": [8, 0]}, "kv_lora_rank"),
    ({"kv_lora_rank": [8, 4.7]}, "kv_lora_rank"),
    ({"kv_lora_rank": "8"}, "kv_lora_rank"),
    ({"kv_lora_rank": [8, 8, 8]}, "kv_lora_rank"),
    ({"qk_rope_head_dim": -2, "rope_freq_indices": None}, "qk_rope_head_dim"),
    ({"qk_rope_head_dim": [4, -2], "rope_freq_indices": None}, "qk_rope_head_dim"),
    ({"qk_rope_head_dim": [4, 3], "rope_freq_indices": None}, "qk_rope_head_dim"),
    ({"rope_freq_indices": [[0, -1], [3]]}, "rope_freq_indices"),
    ({"rope_freq_indices": [[0, 4.7], [3]]}, "rope_freq_indices"),
    ({"rope_freq_indices": [[0, 100], [3]]}, "rope_freq_indices"),
    ({"rope_freq_indices": [[0, 8], [3]]}, "rope_freq_indices"),  # one past the last of 8 frequencies
    ({"rope_freq_indices": [[0, "1"], [3]]}, "rope_freq_indices"),
    ({"rope_freq_indices": [[0, 1]]}, "rope_freq_indices"),
    ({"rope_freq_indices": [[0], [3]]}, "rope_freq_indices"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "rope_freq_indices"),  # 4 frequencies then: 7 is out of range
    ({"absorb_max_query": "x"}, "absorb_max_query"),
    ({"absorb_max_query": -1}, "absorb_max_query"),
    ({"absorb_max_query": 2.5}, "absorb_max_query"),
    ({"absorbed_attention": "flash"}, "absorbed_attention"),
    ({"fused_down_projection": True}, "fused_down_projection"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"vocab_size": "320"}, "vocab_size"),
    ({"intermediate_size": -1}, "intermediate_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"head_dim": 15.5}, "head_dim"),
    ({"qk_nope_head_dim": 0}, "qk_nope_head_dim"),
    ({"v_head_dim": -16}, "v_head_dim"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps"),
    ({"initializer_range": -0.02}, "initializer_range"),
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"logits_scaling": 0}, "logits_scaling"),
    ({"embedding_multiplier": "x"}, "embedding_multiplier"),
    ({"residual_multiplier": float("nan")}, "residual_multiplier"),
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 0}, "final_logit_softcapping"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"sliding_window": 4.5}, "sliding_window"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention", "global"]}, "layer_types"),
    ({"hidden_act": "no_such_activation"}, "hidden_act"),
    ({"attention_bias": "yes"}, "attention_bias"),
    ({"mlp_bias": 1}, "mlp_bias"),
    ({"kv_a_layernorm": "false"}, "kv_a_layernorm"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.5}},
     "partial_rotary_factor"),
    ({"rope_parameters": "default"}, "rope_parameters"),
]


@pytest.mark.parametrize("change, field", BAD, ids=[f"{k}={v!r}"[:60] for change, _ in BAD for k, v in
                                                     list(change.items())[-1:]])
def test_a_bad_field_is_refused_and_named(change, field):
    with pytest.raises(ValueError) as err:
        MLAConfig(**{**BASE, **change})
    message = str(err.value)
    subject = message.split()[1] if message.startswith("MLAConfig: ") else ""  # the field the message is about
    assert field in subject and "\n" not in message, message


def test_a_bad_field_in_an_export_config_json_is_refused_at_load(tmp_path):
    """What a user meets: ``from_pretrained`` on a folder whose config.json holds -1 among the RoPE indices."""
    data = MLAConfig(**BASE).to_dict()
    data["rope_freq_indices"] = [[0, -1], [3]]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rope_freq_indices"):
        MLAConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("change", [
    {},
    {"kv_lora_rank": 1, "qk_rope_head_dim": 0, "rope_freq_indices": None},  # no RoPE key at all
    {"qk_rope_head_dim": [0, 16], "rope_freq_indices": [[], list(range(8))]},  # every frequency
    {"absorb_max_query": 0, "rms_norm_eps": 1e-5, "attention_dropout": 0, "logits_scaling": 8,
     "attn_logit_softcapping": 50, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
     "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
], ids=["base", "no-rope", "all-frequencies", "limits", "per-layer-type-rope"])
def test_valid_configs_load_and_round_trip(change, tmp_path):
    config = MLAConfig(**{**BASE, **change})
    config.save_pretrained(tmp_path)
    again = MLAConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_the_defaults_are_valid():
    config = MLAConfig()
    assert config.layer_kv_lora_rank(0) == 512 and config.rope_freq_indices[0] == list(range(32))
