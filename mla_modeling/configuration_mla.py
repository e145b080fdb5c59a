"""Configuration of a Multi-head Latent Attention (MLA) model retrofitted from an MHA/GQA/MQA checkpoint.

Self-contained remote code: imports only torch and transformers. Names follow transformers'
``configuration_deepseek_v3.py``.
"""

import re
import warnings

import transformers
from transformers import PretrainedConfig

# The transformers minor versions this remote code is tested with (tests/test_versions.py runs each one).
TESTED_TRANSFORMERS = ((5, 23), (5, 25))


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Refuse a transformers older than the tested range (one line); warn once above it."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return
    found = (int(match.group(1)), int(match.group(2)))
    low, high = (".".join(map(str, v)) for v in TESTED_TRANSFORMERS)
    if found < TESTED_TRANSFORMERS[0]:
        raise ImportError(f"this MLA model needs transformers >= {low} (tested {low} to {high}), found {version}: "
                          f"pip install 'transformers>={low}'")
    if found > TESTED_TRANSFORMERS[1]:
        warnings.warn(f"this MLA model was tested with transformers {low} to {high}, found {version}", stacklevel=2)


check_transformers_version()


class MLAConfig(PretrainedConfig):
    r"""
    Configuration of an [`MLAForCausalLM`]: a decoder (RMSNorm, gated MLP, RoPE) whose attention is DeepSeek-V3
    multi-head latent attention without query compression. The decoder reproduces the source family exactly: where
    the norms sit (`norm_layout`), Gemma's `(1 + w)` norms, embedding / residual / logit multipliers, softcapping,
    per-layer-type RoPE, partial rotary embeddings, layers without RoPE and query/key norms (QK-norm).

    Per token and layer the model caches only the latent `ckv` (`kv_lora_rank` values) and one decoupled RoPE key
    `kpe` shared by all heads (`qk_rope_head_dim` values), instead of `2 * num_key_value_heads * head_dim` values.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000): Vocabulary size.
        hidden_size (`int`, *optional*, defaults to 4096): Dimension of the hidden representations.
        intermediate_size (`int`, *optional*, defaults to 11008): Dimension of the MLP representations.
        num_hidden_layers (`int`, *optional*, defaults to 32): Number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 32): Number of query heads.
        num_key_value_heads (`int`, *optional*): Number of KV heads of the *source* model (informational: MLA has one
            latent shared by all heads).
        head_dim (`int`, *optional*): Head dimension of the *source* model. RoPE frequencies are those of a
            `head_dim`-wide rotary embedding; the decoupled RoPE key uses the subset `rope_freq_indices`.
        kv_lora_rank (`int` or `list[int]`, *optional*, defaults to 512): Width of the cached latent `ckv`; a list
            gives one rank per layer.
        q_lora_rank (`None`): Query compression rank. Always `None` here (queries are not compressed).
        qk_rope_head_dim (`int` or `list[int]`, *optional*, defaults to 64): Width of the decoupled RoPE part of each
            query head and of the shared RoPE key `kpe` (even); a list gives one width per layer. May be 0.
        qk_nope_head_dim (`int`, *optional*, defaults to 128): Width of the non-RoPE part of each query/key head.
        v_head_dim (`int`, *optional*, defaults to 128): Width of each value head.
        rope_freq_indices (`list[list[int]]`, *optional*): Per layer, for each of the `qk_rope_head_dim // 2` RoPE
            pairs of `kpe`, the index of its frequency in the source rotary embedding (0 = fastest). Defaults to
            `0 .. qk_rope_head_dim // 2 - 1`.
        kv_a_layernorm (`bool`, *optional*, defaults to `False`): Normalise the latent `ckv` with an RMSNorm (gain
            `kv_a_layernorm.weight`, eps 1e-6 as in transformers' DeepSeek-V3) before it is cached, as DeepSeek does.
            A converted model does not need it (the factorization is exact without it); the DeepSeek-V3 serving
            format always has it.
        hidden_act (`str`, *optional*, defaults to `"silu"`): MLP activation.
        max_position_embeddings (`int`, *optional*, defaults to 2048): Longest sequence the model was trained for.
        initializer_range (`float`, *optional*, defaults to 0.02): Std of the normal weight initializer.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6): RMSNorm epsilon.
        use_cache (`bool`, *optional*, defaults to `True`): Whether to return the latent cache.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): Tie input and output embeddings.
        rope_parameters (`dict`, *optional*): The source model's RoPE parameters (`rope_theta`, `rope_type`,
            `partial_rotary_factor`, ...), or one such dict per layer type (`{"full_attention": {...},
            "sliding_attention": {...}}`, e.g. Gemma 3).
        attention_bias (`bool`, *optional*, defaults to `False`): Bias on `q_proj` and `kv_a_proj_with_mqa` (e.g. a
            Qwen2 source's q/k/v biases).
        o_proj_bias (`bool`, *optional*, defaults to `False`): Bias on `o_proj`.
        attention_dropout (`float`, *optional*, defaults to 0.0): Dropout on attention probabilities.
        mlp_bias (`bool`, *optional*, defaults to `False`): Bias on the MLP projections.
        sliding_window (`int`, *optional*): Sliding-window size carried over from the source, applied to the layers
            whose `layer_types` entry is `"sliding_attention"`.
        layer_types (`list[str]`, *optional*): `"full_attention"` or `"sliding_attention"` per layer.
        qk_norm (`str`, *optional*): QK-norm of the source: `"head"` (an RMSNorm over each head, Qwen3 / Gemma 3)
            or `"projection"` (over the whole projection, OLMo 2). Then the layer computes the source's normalized
            keys (`k_proj`, `k_norm`) and projects them into the cache (`k_a_proj`); `q_norm` normalizes each query
            head by the RMS of its no-RoPE part (the source's query head) with a gain per output column.
        norm_layout (`str`, *optional*, defaults to `"pre"`): `"pre"` (Llama: `input_layernorm` before attention,
            `post_attention_layernorm` before the MLP), `"sandwich"` (Gemma 2/3: also `post_attention_layernorm`
            after attention, `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP) or
            `"post"` (OLMo 2: `post_attention_layernorm` / `post_feedforward_layernorm` on the block outputs only).
        rms_norm_unit_offset (`bool`, *optional*, defaults to `False`): RMSNorm gain is `1 + weight` (Gemma).
        rms_norm_float_weight (`bool`, *optional*, defaults to `False`): the gain multiplies in float32 before the
            cast back (Gemma, OLMo 2); otherwise after it (Llama).
        embedding_multiplier (`float`, *optional*, defaults to 1.0): Scale of the token embeddings (Gemma:
            `sqrt(hidden_size)`, Granite: `embedding_multiplier`), applied in the embedding dtype.
        residual_multiplier (`float`, *optional*, defaults to 1.0): Scale of each block output before the residual
            add (Granite).
        logits_scaling (`float`, *optional*, defaults to 1.0): Logits are divided by it (Granite).
        attn_logit_softcapping (`float`, *optional*): `tanh` cap of the attention scores (Gemma 2).
        final_logit_softcapping (`float`, *optional*): `tanh` cap of the logits (Gemma 2).
        absorb (`str`, *optional*, defaults to `"auto"`): Attention path. `"auto"`: absorbed attention directly on
            the cached latent for short query blocks (decoding) when no gradient is needed, decompressed per-head
            keys/values otherwise (prefill, training); `"always"` / `"never"` force one path.
        absorb_max_query (`int`, *optional*, defaults to 16): Longest query block that `"auto"` decodes absorbed.
        absorbed_attention (`str`, *optional*, defaults to `"auto"`): How the absorbed path attends over the latent:
            `"bmm"` (batched matmuls, softmax in between), `"sdpa"` (one fused SDPA call, keys = values = the latent)
            or `"auto"` (`"sdpa"` on a CPU, `"bmm"` elsewhere). A soft cap always uses `"bmm"`.
    """

    model_type = "mla_retrofit"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        rope_freq_indices=None,
        kv_a_layernorm=False,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_parameters=None,
        attention_bias=False,
        o_proj_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        sliding_window=None,
        layer_types=None,
        qk_norm=None,
        norm_layout="pre",
        rms_norm_unit_offset=False,
        rms_norm_float_weight=False,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        absorb="auto",
        absorb_max_query=16,
        absorbed_attention="auto",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        if q_lora_rank is not None:
            raise ValueError("MLAConfig: query compression (q_lora_rank) is not supported; use None")
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = None
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_a_layernorm = bool(kv_a_layernorm)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = {k: (dict(v) if isinstance(v, dict) else v) for k, v in
                                (rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}).items()}
        self.attention_bias = attention_bias
        self.o_proj_bias = o_proj_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        if layer_types is None:
            kind = "sliding_attention" if sliding_window else "full_attention"
            layer_types = [kind] * num_hidden_layers
        self.layer_types = list(layer_types)
        for params in self.rope_parameter_sets().values():
            params.setdefault("rope_type", "default")
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"MLAConfig: qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        if norm_layout not in ("pre", "sandwich", "post"):
            raise ValueError(f"MLAConfig: norm_layout must be 'pre', 'sandwich' or 'post', got {norm_layout!r}")
        self.qk_norm = qk_norm
        self.norm_layout = norm_layout
        self.rms_norm_unit_offset = bool(rms_norm_unit_offset)
        self.rms_norm_float_weight = bool(rms_norm_float_weight)
        self.embedding_multiplier = float(embedding_multiplier)
        self.residual_multiplier = float(residual_multiplier)
        self.logits_scaling = float(logits_scaling)
        self.attn_logit_softcapping = attn_logit_softcapping
        self.final_logit_softcapping = final_logit_softcapping
        if absorb not in ("auto", "always", "never"):
            raise ValueError(f"MLAConfig: absorb must be 'auto', 'always' or 'never', got {absorb!r}")
        self.absorb = absorb
        self.absorb_max_query = absorb_max_query
        if absorbed_attention not in ("auto", "bmm", "sdpa"):
            raise ValueError(f"MLAConfig: absorbed_attention must be 'auto', 'bmm' or 'sdpa', got {absorbed_attention!r}")
        self.absorbed_attention = absorbed_attention
        self._per_layer(kv_lora_rank)  # validates the length of a per-layer list
        ropes = self._per_layer(qk_rope_head_dim)
        if any(d % 2 for d in ropes):
            raise ValueError(f"MLAConfig: qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        if rope_freq_indices is None:
            rope_freq_indices = [list(range(d // 2)) for d in ropes]
        if len(rope_freq_indices) != num_hidden_layers or any(
            len(idx) != d // 2 for idx, d in zip(rope_freq_indices, ropes)
        ):
            raise ValueError("MLAConfig: rope_freq_indices needs one list of qk_rope_head_dim // 2 indices per layer")
        self.rope_freq_indices = [[int(i) for i in idx] for idx in rope_freq_indices]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _per_layer(self, value):
        if isinstance(value, (list, tuple)):
            if len(value) != self.num_hidden_layers:
                raise ValueError(f"MLAConfig: per-layer list of length {len(value)} for {self.num_hidden_layers} layers")
            return [int(v) for v in value]
        return [int(value)] * self.num_hidden_layers

    def rope_parameter_sets(self) -> dict:
        """`{layer_type: rope parameters}` when `rope_parameters` is given per layer type, else `{None: it}`."""
        nested = [k for k in self.rope_parameters if k in set(self.layer_types)]
        if nested:
            return {k: self.rope_parameters[k] for k in nested}
        return {None: self.rope_parameters}

    def layer_kv_lora_rank(self, layer_idx: int) -> int:
        """Latent width `kv_lora_rank` of layer `layer_idx`."""
        return self._per_layer(self.kv_lora_rank)[layer_idx]

    def layer_rope_dim(self, layer_idx: int) -> int:
        """Decoupled RoPE width `qk_rope_head_dim` of layer `layer_idx`."""
        return self._per_layer(self.qk_rope_head_dim)[layer_idx]

    def cache_values_per_token(self) -> int:
        """Values cached per token, summed over all layers: sum of `kv_lora_rank + qk_rope_head_dim`."""
        return sum(self.layer_kv_lora_rank(i) + self.layer_rope_dim(i) for i in range(self.num_hidden_layers))


__all__ = ["MLAConfig", "check_transformers_version"]
