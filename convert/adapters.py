"""One adapter table keyed by ``config.model_type``: everything that differs between source families.

Every family is one function ``config -> Layout`` in ``FAMILIES``; it reads ``config.json`` only (never names or
paths) and describes the family fully: attention (head counts, biases, fused projections, QK-norm and where it sits,
softmax scale, soft cap), RoPE (per layer type, partial rotary, layers without RoPE), sliding windows, and the
decoder around the attention (norm placement and numerics, embedding / residual / logit multipliers), which
becomes the export's ``MLAConfig``. Adding a family is one entry here plus its tiny model in ``tests/conftest.py``.
MHA / GQA / MQA is read from the head counts. Anything else is refused with a one-line message naming what.
"""

import math
from dataclasses import dataclass, field

from .errors import MLAError, quote

ROPE_TYPES = {"default", "linear", "llama3", "dynamic", "yarn", "longrope"}
# Families that are known but not convertible, and why (the message names what is unsupported).
REFUSED = {
    "qwen3_moe": "mixture-of-experts layers (routed experts)",
    "qwen2_moe": "mixture-of-experts layers (routed experts)",
    "mixtral": "mixture-of-experts layers (routed experts)",
    "olmoe": "mixture-of-experts layers (routed experts)",
    "granitemoe": "mixture-of-experts layers (routed experts)",
    "granitemoeshared": "mixture-of-experts layers (routed experts)",
    "granitemoehybrid": "mixture-of-experts and Mamba layers",
    "phimoe": "mixture-of-experts layers (routed experts)",
    "deepseek_v2": "a model that already has MLA",
    "deepseek_v3": "a model that already has MLA",
    "gemma3n": "a multimodal model with per-layer embeddings (Gemma 3n)",
    "gemma3n_text": "per-layer embeddings and AltUp (Gemma 3n)",
    "olmo3": "this family (not tested yet)",
    "cohere2": "this family (not tested yet)",
    "llava": "a multimodal model (only the text model of gemma3 checkpoints is converted)",
    "qwen2_vl": "a multimodal model (only the text model of gemma3 checkpoints is converted)",
    "qwen2_5_vl": "a multimodal model (only the text model of gemma3 checkpoints is converted)",
    "mllama": "a multimodal model (only the text model of gemma3 checkpoints is converted)",
}
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


# Tensor names every supported family shares (the Hugging Face decoder layout). A family's own names (fused
# projections, QK-norms, a multimodal wrapper's prefixes) live in its Layout entry below; nothing outside this file
# spells a source tensor's name.
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"
# Where the text model of a multimodal checkpoint keeps its tensors (transformers 5 names, then the older ones).
TEXT_PREFIXES = ({"model.": "model.language_model.", "lm_head.": "lm_head."},
                 {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."})


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def attention_prefix(i: int) -> str:
    return f"model.layers.{i}.self_attn."


def is_attention(name: str) -> bool:
    return ".self_attn." in name


@dataclass(frozen=True)
class Layout:
    """What the conversion needs to know about a source model (``text`` the config of its text model)."""

    model_type: str
    num_layers: int
    num_heads: int  # n_h query heads
    num_kv_heads: int  # g
    head_dim: int  # d_h
    hidden_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_parameters: dict  # flat, or one dict per layer type
    sliding_window: int | None
    layer_types: list[str]
    rotary_dim: int = 0  # dims of each head that RoPE rotates (the first ``rotary_dim``); 0 = d_h
    rope_layers: tuple = ()  # per layer: does it apply RoPE (SmolLM3's NoPE layers do not); () = all
    qk_norm: str | None = None  # "head" / "projection"
    qk_norm_transposed: bool = False  # the norm's output is (B, H, T, d_h) (Gemma 3), else (B, T, ...)
    fused_qkv: str | None = None  # module name of a fused q|k|v projection (Phi-3)
    fused_mlp: str | None = None  # module name of a fused gate|up projection (Phi-3)
    attention_scale: float | None = None  # softmax scale when not d_h^-1/2
    decoder: dict = field(default_factory=dict)  # MLAConfig fields of the decoder around the attention
    text_of: str | None = None  # the outer model_type when this is the text model of a multimodal checkpoint
    frequencies: dict = field(default_factory=dict)  # layer type (or None): (inv_freq list, attention scaling)

    @property
    def kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def kv_values_per_token_layer(self) -> int:
        """Original cache per token per layer: 2 * g * d_h."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def qkv_slices(self) -> dict[str, slice]:
        """Rows of q, k and v in a fused q|k|v projection (Phi-3)."""
        nq, nk = self.num_heads * self.head_dim, self.kv_dim
        return {"q": slice(0, nq), "k": slice(nq, nq + nk), "v": slice(nq + nk, nq + 2 * nk)}

    def attention_tensors(self, reader, i: int) -> dict:
        """Layer ``i``'s attention tensors from a ``readers.TensorReader`` under the short names ``q_proj.weight``,
        ``k_proj.bias``, ``o_proj.weight``, ``q_norm.weight``, ... (a fused q|k|v projection split into q, k, v)."""
        p = attention_prefix(i)
        names = reader.names()
        mods = [self.fused_qkv] if self.fused_qkv else ["q_proj", "k_proj", "v_proj"]
        mods += ["o_proj"] + (["q_norm", "k_norm"] if self.qk_norm else [])
        want = [p + f"{m}.{t}" for m in mods for t in ("weight", "bias") if p + f"{m}.{t}" in names]
        w = {n[len(p):]: t for n, t in reader.get(want).items()}
        if self.fused_qkv:
            fused_w, fused_b = w.pop(f"{self.fused_qkv}.weight"), w.pop(f"{self.fused_qkv}.bias", None)
            for name, rows in self.qkv_slices().items():
                w[f"{name}_proj.weight"] = fused_w[rows]
                if fused_b is not None:
                    w[f"{name}_proj.bias"] = fused_b[rows]
        return w

    def export_tensors(self, name: str, t) -> list[tuple]:
        """A source tensor outside the attention under its export name(s): a fused gate|up projection (Phi-3, gate
        rows first) becomes ``gate_proj`` and ``up_proj``; every other tensor is kept as it is."""
        fused = f".mlp.{self.fused_mlp}." if self.fused_mlp else None
        if fused and fused in name:
            gate, up = t.chunk(2, dim=0)  # (I, d) each
            return [(name.replace(fused, ".mlp.gate_proj."), gate), (name.replace(fused, ".mlp.up_proj."), up)]
        return [(name, t)]

    def layer_rotary_dim(self, i: int) -> int:
        """Dims of each head that RoPE rotates in layer ``i`` (0 for a layer without RoPE)."""
        if self.rope_layers and not self.rope_layers[i]:
            return 0
        return self.rotary_dim or self.head_dim

    def rope_capacity(self, i: int) -> int:
        """The most decoupled-RoPE values layer ``i`` can keep: ``g * rotary_dim``."""
        return self.num_kv_heads * self.layer_rotary_dim(i)

    def layer_frequencies(self, i: int) -> tuple[list[float], float]:
        """``(inv_freq, attention_scaling)`` of layer ``i``'s RoPE (the source's own frequencies)."""
        key = self.layer_types[i] if None not in self.frequencies else None
        return self.frequencies[key]


def _rope_sets(rope: dict, layer_types) -> dict:
    nested = [k for k in rope if k in set(layer_types)]
    return {k: rope[k] for k in nested} if nested else {None: rope}


def _frequencies(config, rope: dict, layer_types, head_dim: int, rotary_dim: int) -> dict:
    """Each RoPE parameter set's inverse frequencies and attention scaling, as the source computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = {}
    for key, params in _rope_sets(rope, layer_types).items():
        if params is None:
            continue
        rope_type = params.get("rope_type", params.get("type", "default"))
        try:
            if rope_type == "default":
                base = float(params.get("rope_theta", 10000.0))
                out[key] = ([base ** (-(2 * i) / rotary_dim) for i in range(rotary_dim // 2)], 1.0)
            else:
                kwargs = {"layer_type": key} if key is not None else {}
                inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
                out[key] = ([float(f) for f in inv], float(scaling))
        except (ArithmeticError, TypeError, ValueError, KeyError) as err:
            raise MLAError(f"invalid RoPE parameters {quote(params)} in {config.model_type}: {err}") from None
        _check_frequencies(out[key], params, config.model_type)
    return out


def _check_frequencies(frequencies: tuple, params: dict, model_type: str) -> None:
    """MLAError unless every RoPE frequency and the attention scaling are positive finite real numbers (a negative
    ``rope_theta`` gives complex ones, a zero one a division by zero)."""
    inv, scaling = frequencies
    for value in (*inv, scaling):
        if not isinstance(value, float) or not 0 < value < math.inf:
            raise MLAError(f"invalid RoPE parameters {quote(params)} in {model_type}: they give the frequency or "
                           f"scaling {quote(value)}, not a positive finite number")


def _rope(config, layer_types, partial_ok: bool) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    rope = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rope.items()}
    if not rope:
        rope = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    for key, params in _rope_sets(rope, layer_types).items():
        if params is None:
            continue
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise MLAError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(sorted(ROPE_TYPES))})")
        if not partial_ok and float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise MLAError(f"unsupported: partial rotary embeddings (partial_rotary_factor != 1) in "
                           f"{config.model_type}")
    return rope


def _windows(config, window, layer_types):
    """``(sliding_window, layer_types)``: no window means every layer is full attention."""
    n = config.num_hidden_layers
    if not window:
        return None, ["full_attention"] * n
    if layer_types is None:
        layer_types = ["sliding_attention"] * n
    return int(window), list(layer_types)


def _common(config, *, qkv_bias: bool, o_bias: bool, window=None, layer_types=None, partial_rotary=False,
            **family) -> Layout:
    for key in _EXPERT_KEYS:
        if getattr(config, key, None):
            raise MLAError(f"unsupported: mixture-of-experts layers ({key}={getattr(config, key)}) in "
                           f"{config.model_type}")
    if getattr(config, "use_bidirectional_attention", None):
        raise MLAError(f"unsupported: bidirectional attention (use_bidirectional_attention) in {config.model_type}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise MLAError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise MLAError(f"head_dim {head_dim} is odd: RoPE needs an even head dimension")
    n = config.num_hidden_layers
    window, layer_types = _windows(config, window, layer_types)
    rope = _rope(config, layer_types, partial_rotary)
    rotary_dim = head_dim
    if partial_rotary:
        factors = {float(p.get("partial_rotary_factor", 1.0) or 1.0) for p in _rope_sets(rope, layer_types).values()
                   if p is not None}
        if len(factors) != 1:
            raise MLAError(f"unsupported: different partial_rotary_factor per layer type in {config.model_type}")
        rotary_dim = int(head_dim * factors.pop())
        if rotary_dim % 2 or rotary_dim <= 0:
            raise MLAError(f"unsupported: a rotary dimension of {rotary_dim} (partial_rotary_factor) in "
                           f"{config.model_type}")
    decoder = dict(hidden_act=getattr(config, "hidden_activation", None) or config.hidden_act)
    decoder.update(family.pop("decoder", {}))
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
        rope_parameters=rope,
        sliding_window=window,
        layer_types=layer_types,
        rotary_dim=rotary_dim,
        decoder=decoder,
        frequencies=_frequencies(config, rope, layer_types, head_dim, rotary_dim),
        **family,
    )


def _bias(config) -> bool:
    return bool(getattr(config, "attention_bias", False))


# --- the families ------------------------------------------------------------------------------------------------
def _llama(config) -> Layout:
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config))


def _mistral(config) -> Layout:
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config), window=getattr(config, "sliding_window", None))


def _qwen_window(config):
    """Qwen2/Qwen3/SmolLM3: a window only with ``use_sliding_window``, on the layers ``layer_types`` names."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    layer_types = getattr(config, "layer_types", None)
    if window and layer_types is None:
        start = getattr(config, "max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(config.num_hidden_layers)]
    return window, layer_types


def _qwen2(config) -> Layout:
    window, layer_types = _qwen_window(config)
    return _common(config, qkv_bias=True, o_bias=False, window=window, layer_types=layer_types)


def _qwen3(config) -> Layout:
    window, layer_types = _qwen_window(config)
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config), window=window, layer_types=layer_types,
                   qk_norm="head")


def _smollm3(config) -> Layout:
    window, layer_types = _qwen_window(config)
    n = config.num_hidden_layers
    flags = getattr(config, "no_rope_layers", None) or [1] * n  # 1 = the layer uses RoPE
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config), window=window, layer_types=layer_types,
                   rope_layers=tuple(bool(f) for f in flags))


_GEMMA_NORMS = dict(norm_layout="sandwich", rms_norm_unit_offset=True, rms_norm_float_weight=True)


def _gemma_scale(config) -> float:
    return float(config.query_pre_attn_scalar) ** -0.5


def _gemma2(config) -> Layout:
    decoder = dict(_GEMMA_NORMS, embedding_multiplier=config.hidden_size**0.5,
                   attn_logit_softcapping=getattr(config, "attn_logit_softcapping", None),
                   final_logit_softcapping=getattr(config, "final_logit_softcapping", None))
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config), window=config.sliding_window,
                   layer_types=config.layer_types, attention_scale=_gemma_scale(config), decoder=decoder)


def _gemma3_text(config, text_of=None) -> Layout:
    # transformers 5 ignores attn_logit_softcapping for Gemma 3; the multimodal model never soft-caps its logits.
    final_cap = None if text_of else getattr(config, "final_logit_softcapping", None)
    decoder = dict(_GEMMA_NORMS, embedding_multiplier=config.hidden_size**0.5, final_logit_softcapping=final_cap)
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config), window=config.sliding_window,
                   layer_types=config.layer_types, attention_scale=_gemma_scale(config), qk_norm="head",
                   qk_norm_transposed=True, decoder=decoder, text_of=text_of)


def _phi3(config) -> Layout:
    return _common(config, qkv_bias=False, o_bias=False, window=getattr(config, "sliding_window", None),
                   partial_rotary=True, fused_qkv="qkv_proj", fused_mlp="gate_up_proj")


def _olmo2(config) -> Layout:
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config), qk_norm="projection",
                   decoder=dict(norm_layout="post", rms_norm_float_weight=True))


def _granite(config) -> Layout:
    decoder = dict(embedding_multiplier=float(config.embedding_multiplier),
                   residual_multiplier=float(config.residual_multiplier), logits_scaling=float(config.logits_scaling))
    return _common(config, qkv_bias=_bias(config), o_bias=_bias(config),
                   attention_scale=float(config.attention_multiplier), decoder=decoder)


FAMILIES = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "granite": _granite,
    "smollm3": _smollm3,
}
MULTIMODAL = {"gemma3": "gemma3_text"}  # checkpoints whose text model is converted (the vision tower is dropped)
ADAPTERS = {**FAMILIES, **MULTIMODAL}  # every model_type that `mla convert` accepts


def text_config(config):
    """The config of the model that is converted: the text model of a multimodal checkpoint, else ``config``."""
    if getattr(config, "model_type", None) in MULTIMODAL:
        return config.get_text_config()
    return config


def read_layout(config) -> Layout:
    """The layout of a source config, or MLAError naming what is unsupported."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(ADAPTERS))
    if model_type in REFUSED:
        raise MLAError(f"unsupported model_type {model_type!r}: {REFUSED[model_type]} cannot be converted; "
                       f"supported: {supported}")
    if model_type in MULTIMODAL:
        text = config.get_text_config()
        if text.model_type != MULTIMODAL[model_type]:
            raise MLAError(f"unsupported {model_type!r} checkpoint: its text model is {text.model_type!r}")
        return _gemma3_text(text, text_of=model_type)
    if model_type not in FAMILIES:
        if getattr(config, "vision_config", None) is not None:
            raise MLAError(f"unsupported model_type {model_type!r}: a multimodal model; supported: {supported}")
        raise MLAError(f"unsupported model_type {model_type!r}; supported: {supported}")
    return FAMILIES[model_type](config)


def expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes every family with separate q/k/v and gate/up projections has, implied by the config's
    dimensions ``c`` (``weights._dims``)."""
    want = {EMBED: (c["V"], c["d"])}
    if not c["tied"]:
        want[HEAD] = (c["V"], c["d"])
    for i in range(c["L"]):
        p = layer_prefix(i)
        want[p + "self_attn.q_proj.weight"] = (c["H"] * c["dh"], c["d"])
        want[p + "self_attn.k_proj.weight"] = (c["g"] * c["dh"], c["d"])
        want[p + "self_attn.v_proj.weight"] = (c["g"] * c["dh"], c["d"])
        want[p + "self_attn.o_proj.weight"] = (c["d"], c["H"] * c["dh"])
        if c["I"]:
            want[p + "mlp.gate_proj.weight"] = (c["I"], c["d"])
            want[p + "mlp.down_proj.weight"] = (c["d"], c["I"])
    return want


def gguf_expected_sizes(c: dict) -> dict[str, int]:
    """Values per tensor a GGUF file of a llama-like model holds under llama.cpp's names, implied by ``c``."""
    want = {"token_embd.weight": c["V"] * c["d"]}
    for i in range(c["L"]):
        want[f"blk.{i}.attn_q.weight"] = c["H"] * c["dh"] * c["d"]
        want[f"blk.{i}.attn_k.weight"] = c["g"] * c["dh"] * c["d"]
        want[f"blk.{i}.attn_v.weight"] = c["g"] * c["dh"] * c["d"]
    return want
