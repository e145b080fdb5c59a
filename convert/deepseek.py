"""The DeepSeek-V3 serving format: one of our MLA models as a stock ``model_type: deepseek_v3`` checkpoint.

transformers' ``DeepseekV3ForCausalLM`` (and, by their loaders, vLLM and SGLang; see
``docs/deepseek-v3-serving-research.md``) run MLA natively, under constraints an MLA model must meet first:
- one ``kv_lora_rank`` and one ``qk_rope_head_dim`` for all layers, no query compression, no biases, a Llama-style
  decoder (pre-norms, SiLU MLP, no QK-norm, multipliers or soft caps), every layer dense;
- the latent is always normalised (``kv_a_layernorm``);
- RoPE frequencies ``theta^(-2j / qk_rope_head_dim)``: the kept frequencies of the source's ``d_h / 2`` must be every
  ``c``-th one (``c = d_h / qk_rope_head_dim``, the same ``theta``), in interleaved pairs;
- the softmax scale ``(qk_nope_head_dim + qk_rope_head_dim)^-1/2`` (ours already).

``deepseek_v3_tensors`` maps the tensors (the RoPE rows of ``q_proj`` and ``kv_a_proj_with_mqa`` permuted from
rotate-half ``[re | im]`` to interleaved ``(re_j, im_j)`` pairs) and builds the config; anything the format cannot
express is an MLAError naming why.
"""

import torch

from .errors import MLAError


def _uniform(name: str, values: list[int]) -> int:
    if len(set(values)) != 1:
        raise MLAError(f"the deepseek_v3 format needs one {name} for all layers, this model has {sorted(set(values))}")
    return values[0]


def check_deepseek_v3(config) -> tuple[int, int, float]:
    """``(kv_lora_rank, qk_rope_head_dim, rope_theta)`` of an ``MLAConfig`` the format can express, else MLAError."""
    if not config.kv_a_layernorm:
        raise MLAError("the deepseek_v3 format always normalises the latent (kv_a_layernorm); this model has no "
                       "latent norm")
    n = config.num_hidden_layers
    rank = _uniform("kv_lora_rank", [config.layer_kv_lora_rank(i) for i in range(n)])
    rope = _uniform("qk_rope_head_dim", [config.layer_rope_dim(i) for i in range(n)])
    if rope == 0 or config.head_dim % rope:
        raise MLAError(f"the deepseek_v3 format needs a RoPE width dividing head_dim {config.head_dim}, not {rope}")
    stride = config.head_dim // rope
    want = [j * stride for j in range(rope // 2)]
    if any(list(idx) != want for idx in config.rope_freq_indices):
        raise MLAError(f"the deepseek_v3 format needs the RoPE frequencies {want} (every {stride}-th) in every layer")
    unsupported = {
        "attention biases": config.attention_bias or config.o_proj_bias,
        "MLP biases": config.mlp_bias,
        "QK-norm": config.qk_norm is not None,
        f"norm layout {config.norm_layout!r}": config.norm_layout != "pre",
        "(1 + w) or float32 norm gains": config.rms_norm_unit_offset or config.rms_norm_float_weight,
        "embedding / residual / logit multipliers": (config.embedding_multiplier, config.residual_multiplier,
                                                     config.logits_scaling) != (1.0, 1.0, 1.0),
        "soft caps": config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None,
        "sliding windows": "sliding_attention" in config.layer_types,
        f"activation {config.hidden_act!r}": config.hidden_act != "silu",
    }
    bad = [what for what, present in unsupported.items() if present]
    if bad:
        raise MLAError(f"the deepseek_v3 format cannot express {bad[0]} (a Llama-style decoder is required)")
    sets = config.rope_parameter_sets()
    params = sets.get(None)
    if params is None or params.get("rope_type", "default") != "default" or \
            float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise MLAError("the deepseek_v3 format needs plain RoPE (rope_type 'default', full rotary); this model has "
                       f"{config.rope_parameters}")
    return rank, rope, float(params["rope_theta"])


def _interleave(rows: torch.Tensor, rope: int) -> torch.Tensor:
    """RoPE rows ``[re_0..re_{r/2-1} | im_0..im_{r/2-1}]`` (rotate-half) -> ``re_0, im_0, re_1, im_1, ...``."""
    half = rope // 2
    order = [k for j in range(half) for k in (j, j + half)]
    return rows[order]


def deepseek_v3_tensors(config, state: dict[str, torch.Tensor]):
    """``(DeepseekV3Config, tensors)`` of the MLA model ``config`` (an ``MLAConfig``) with weights ``state``."""
    from transformers import DeepseekV3Config

    rank, rope, theta = check_deepseek_v3(config)
    heads, nope, v_dim = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            q = t.view(heads, nope + rope, -1)
            t = torch.cat((q[:, :nope], torch.stack([_interleave(q[h, nope:], rope) for h in range(heads)])), 1)
            t = t.reshape(heads * (nope + rope), -1)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            t = torch.cat((t[:rank], _interleave(t[rank:], rope)))
        out[name] = t.contiguous()
    if "lm_head.weight" not in out:  # vLLM never ties: the head is written out
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    n = config.num_hidden_layers
    ds = DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size, num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=heads, n_shared_experts=1, n_routed_experts=1,
        num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=n, moe_layer_freq=1,
        num_mtp_layers=0, kv_lora_rank=rank, q_lora_rank=None, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
        v_head_dim=v_dim, hidden_act="silu", max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": theta},
        rope_interleave=True, attention_bias=False, attention_dropout=config.attention_dropout,
        tie_word_embeddings=False, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    ds.architectures = ["DeepseekV3ForCausalLM"]
    return ds, out
