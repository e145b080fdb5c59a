"""One adapter table keyed by ``config.model_type``: how to read a source architecture.

Llama, Mistral and Qwen2 share module names (``model.layers[i].self_attn.{q,k,v,o}_proj``); they differ in biases and
sliding windows. MHA / GQA / MQA is read from the head counts. Anything else is refused with a clear message.
"""

from dataclasses import dataclass

from .errors import MLAError

# Families with per-head norms on q/k (QK-norm) cannot be rewritten exactly: the norm acts per head before RoPE.
QK_NORM_FAMILIES = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2", "olmo3", "cohere2", "chameleon"}
STATIC_ROPE_TYPES = {"default", "linear", "llama3"}


@dataclass(frozen=True)
class Layout:
    """What the conversion needs to know about a source model's attention."""

    model_type: str
    num_layers: int
    num_heads: int  # n_h query heads
    num_kv_heads: int  # g
    head_dim: int  # d_h
    hidden_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_parameters: dict
    sliding_window: int | None
    layer_types: list[str]

    @property
    def kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def kv_values_per_token_layer(self) -> int:
        """Original cache per token per layer: 2 * g * d_h."""
        return 2 * self.num_kv_heads * self.head_dim


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise MLAError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(sorted(STATIC_ROPE_TYPES))})")
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise MLAError("unsupported: partial rotary embeddings (partial_rotary_factor != 1)")
    return rope


def _common(config, qkv_bias: bool, o_bias: bool, sliding_window, layer_types) -> Layout:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise MLAError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise MLAError(f"head_dim {head_dim} is odd: RoPE needs an even head dimension")
    n = config.num_hidden_layers
    if layer_types is None:
        layer_types = ["sliding_attention" if sliding_window else "full_attention"] * n
    return Layout(
        model_type=config.model_type,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        rope_parameters=_rope(config),
        sliding_window=sliding_window if "sliding_attention" in layer_types else None,
        layer_types=list(layer_types),
    )


def _llama(config) -> Layout:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(config, bias, bias, None, None)


def _mistral(config) -> Layout:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(config, bias, bias, getattr(config, "sliding_window", None), None)


def _qwen2(config) -> Layout:
    # transformers sets sliding_window=None unless use_sliding_window, and layer_types per layer.
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        start = getattr(config, "max_window_layers", 0)
        layer_types = [
            "sliding_attention" if window and i >= start else "full_attention" for i in range(config.num_hidden_layers)
        ]
    return _common(config, True, False, window, layer_types)


ADAPTERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2}


def read_layout(config) -> Layout:
    """The attention layout of a source config, or MLAError naming what is unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type in QK_NORM_FAMILIES:
        raise MLAError(
            f"unsupported model_type {model_type!r}: QK-norm attention (per-head q/k norms) cannot be rewritten "
            f"exactly as MLA; supported: {', '.join(sorted(ADAPTERS))}"
        )
    if model_type not in ADAPTERS:
        raise MLAError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](config)
