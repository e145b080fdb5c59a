"""Configuration of a Multi-head Latent Attention (MLA) model retrofitted from an MHA/GQA/MQA checkpoint.

Self-contained remote code: imports only torch and transformers. Names follow transformers'
``configuration_deepseek_v3.py``.
"""

import math
import numbers
import re
import warnings

import transformers
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

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

LAYER_TYPES = ("full_attention", "sliding_attention")


def _fail(name: str, rule: str, value) -> None:
    text = repr(value)
    raise ValueError(f"MLAConfig: {name} must be {rule}, got {text if len(text) <= 80 else text[:77] + '...'}")


def _integer(name: str, value, low: int = 1) -> int:
    """``value`` as an int when it is an integer (not a bool, not a float) of at least ``low``; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        _fail(name, f"an integer >= {low}", value)
    return int(value)


def _number(name: str, value, low: float | None = None, *, above: bool = False, below: float | None = None) -> float:
    """``value`` as a float when it is a finite number, >= ``low`` (> with ``above``) and < ``below`` where given;
    else ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if (not ok or low is not None and (value < low or above and value == low)
            or below is not None and value >= below):
        rule = "a finite number" + (f" {'>' if above else '>='} {low:g}" if low is not None else "")
        _fail(name, rule + (f" and < {below:g}" if below is not None else ""), value)
    return float(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(name, "true or false", value)
    return value


def _per_layer_ints(name: str, value, layers: int, low: int) -> list[int]:
    """One integer >= ``low`` per layer from an int or a list of ``layers`` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            _fail(name, f"an integer or a list of one per layer ({layers})", value)
        return [_integer(f"{name}[{i}]", v, low) for i, v in enumerate(value)]
    return [_integer(name, value, low)] * layers


def _check_rope_parameters(sets: dict, head_dim: int) -> dict:
    """``{layer_type or None: number of source RoPE frequencies}``; ValueError naming a bad ``rope_theta`` or
    ``partial_rotary_factor``."""
    counts = {}
    for layer_type, params in sets.items():
        where = "rope_parameters" + (f".{layer_type}" if layer_type is not None else "")
        if params is None:  # a layer type without RoPE
            counts[layer_type] = 0
            continue
        if not isinstance(params, dict):
            _fail(where, "a mapping of RoPE settings", params)
        _number(f"{where}.rope_theta", params.get("rope_theta"), 0, above=True)
        factor = _number(f"{where}.partial_rotary_factor", params.get("partial_rotary_factor", 1.0), 0, above=True)
        if factor > 1:
            _fail(f"{where}.partial_rotary_factor", "in (0, 1]", factor)
        if not isinstance(params.get("rope_type", "default"), str):
            _fail(f"{where}.rope_type", "a string", params.get("rope_type"))
        counts[layer_type] = int(head_dim * factor) // 2
    return counts


def _check_rope_indices(indices, ropes: list[int], frequencies: list[int]) -> list[list[int]]:
    """Per layer, ``qk_rope_head_dim // 2`` integer indices into the layer's ``frequencies`` source RoPE frequencies."""
    if not isinstance(indices, (list, tuple)) or len(indices) != len(ropes):
        _fail("rope_freq_indices", f"a list of one list of indices per layer ({len(ropes)})", indices)
    checked = []
    for layer, (idx, d, count) in enumerate(zip(indices, ropes, frequencies)):
        if not isinstance(idx, (list, tuple)) or len(idx) != d // 2:
            _fail(f"rope_freq_indices[{layer}]", f"a list of qk_rope_head_dim // 2 = {d // 2} indices", idx)
        for j, i in enumerate(idx):
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < count:
                _fail(f"rope_freq_indices[{layer}][{j}]", f"an integer in [0, {count}) (the source's RoPE "
                      "frequencies)", i)
        checked.append([int(i) for i in idx])
    return checked


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
        fused_down_projection (`str`, *optional*, defaults to `"auto"`): Whether inference runs `q_proj`,
            `kv_a_proj_with_mqa` (and QK-norm's `k_proj`), which read the same input, as one GEMM over their stacked
            weights (the modules' weights become views of it: no memory kept twice, the checkpoint's names stay).
            `"auto"`: on a GPU (one kernel launch instead of two or three), not on a CPU, where the separate GEMMs read
            the same bytes and were as fast; `"always"` / `"never"`.
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
        fused_down_projection="auto",
        **kwargs,
    ):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size), ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads), ("qk_nope_head_dim", qk_nope_head_dim),
                            ("v_head_dim", v_head_dim), ("max_position_embeddings", max_position_embeddings)):
            _integer(name, value)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = _integer("num_key_value_heads", num_key_value_heads or num_attention_heads)
        self.head_dim = _integer("head_dim", head_dim or hidden_size // num_attention_heads)
        if q_lora_rank is not None:
            raise ValueError("MLAConfig: query compression (q_lora_rank) is not supported; use None")
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = None
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_a_layernorm = _flag("kv_a_layernorm", kv_a_layernorm)
        if not isinstance(hidden_act, str) or hidden_act not in ACT2FN:
            _fail("hidden_act", "an activation transformers knows (silu, gelu_pytorch_tanh, ...)", hidden_act)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = _number("initializer_range", initializer_range, 0)
        self.rms_norm_eps = _number("rms_norm_eps", rms_norm_eps, 0, above=True)
        self.use_cache = _flag("use_cache", use_cache)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            _fail("rope_parameters", "a mapping of RoPE settings", rope_parameters)
        self.rope_parameters = {k: (dict(v) if isinstance(v, dict) else v) for k, v in
                                (rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}).items()}
        self.attention_bias = _flag("attention_bias", attention_bias)
        self.o_proj_bias = _flag("o_proj_bias", o_proj_bias)
        self.attention_dropout = _number("attention_dropout", attention_dropout, 0, below=1)
        self.mlp_bias = _flag("mlp_bias", mlp_bias)
        self.sliding_window = None if sliding_window is None else _integer("sliding_window", sliding_window)
        if layer_types is None:
            kind = "sliding_attention" if sliding_window else "full_attention"
            layer_types = [kind] * num_hidden_layers
        if (not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_hidden_layers
                or any(t not in LAYER_TYPES for t in layer_types)):
            _fail("layer_types", f"a list of {num_hidden_layers} of {', '.join(LAYER_TYPES)}", layer_types)
        self.layer_types = list(layer_types)
        frequencies = _check_rope_parameters(self.rope_parameter_sets(), self.head_dim)
        for params in self.rope_parameter_sets().values():
            if params is not None:
                params.setdefault("rope_type", "default")
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"MLAConfig: qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        if norm_layout not in ("pre", "sandwich", "post"):
            raise ValueError(f"MLAConfig: norm_layout must be 'pre', 'sandwich' or 'post', got {norm_layout!r}")
        self.qk_norm = qk_norm
        self.norm_layout = norm_layout
        self.rms_norm_unit_offset = _flag("rms_norm_unit_offset", rms_norm_unit_offset)
        self.rms_norm_float_weight = _flag("rms_norm_float_weight", rms_norm_float_weight)
        self.embedding_multiplier = _number("embedding_multiplier", embedding_multiplier)
        self.residual_multiplier = _number("residual_multiplier", residual_multiplier)
        self.logits_scaling = _number("logits_scaling", logits_scaling, 0, above=True)
        for name, cap in (("attn_logit_softcapping", attn_logit_softcapping),
                          ("final_logit_softcapping", final_logit_softcapping)):
            if cap is not None:
                _number(name, cap, 0, above=True)
        self.attn_logit_softcapping = attn_logit_softcapping
        self.final_logit_softcapping = final_logit_softcapping
        if absorb not in ("auto", "always", "never"):
            raise ValueError(f"MLAConfig: absorb must be 'auto', 'always' or 'never', got {absorb!r}")
        self.absorb = absorb
        self.absorb_max_query = _integer("absorb_max_query", absorb_max_query, 0)
        if absorbed_attention not in ("auto", "bmm", "sdpa"):
            raise ValueError("MLAConfig: absorbed_attention must be 'auto', 'bmm' or 'sdpa', got "
                             f"{absorbed_attention!r}")
        self.absorbed_attention = absorbed_attention
        if fused_down_projection not in ("auto", "always", "never"):
            raise ValueError("MLAConfig: fused_down_projection must be 'auto', 'always' or 'never', got "
                             f"{fused_down_projection!r}")
        self.fused_down_projection = fused_down_projection
        _per_layer_ints("kv_lora_rank", kv_lora_rank, num_hidden_layers, 1)
        ropes = _per_layer_ints("qk_rope_head_dim", qk_rope_head_dim, num_hidden_layers, 0)
        if any(d % 2 for d in ropes):
            _fail("qk_rope_head_dim", "even", qk_rope_head_dim)
        if rope_freq_indices is None:
            rope_freq_indices = [list(range(d // 2)) for d in ropes]
        layer_frequencies = [frequencies.get(None if None in frequencies else t, 0) for t in self.layer_types]
        self.rope_freq_indices = _check_rope_indices(rope_freq_indices, ropes, layer_frequencies)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=_flag("tie_word_embeddings", tie_word_embeddings),
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
