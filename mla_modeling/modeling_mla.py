"""Multi-head Latent Attention (DeepSeek-V2/V3 style) for models retrofitted from MHA/GQA/MQA checkpoints.

Self-contained remote code: imports only torch and transformers. Module and weight names follow transformers'
``modeling_deepseek_v3.py`` (``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``).

Per layer the cache holds the latent ``ckv`` as ``[B, 1, T, kv_lora_rank]`` and the shared RoPE key ``kpe`` as
``[B, 1, T, qk_rope_head_dim]`` (the "keys" and "values" slots of a transformers ``Cache``). In a ``DynamicCache``
both live side by side in one buffer that grows geometrically (``MLALatentLayer``): a decode step writes one token
instead of copying the whole cache, and absorbed attention reads ``[ckv | kpe]`` without concatenating them.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

try:  # when loaded as remote code (a package of its own)
    from .configuration_mla import MLAConfig
except ImportError:  # pragma: no cover - when imported as a plain module
    from configuration_mla import MLAConfig


class MLARMSNorm(nn.Module):
    """RMSNorm in the source family's numerics: gain `weight` (or `1 + weight`, Gemma), applied after the cast back
    to the input dtype (Llama) or in float32 before it (Gemma, OLMo 2)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False, float_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.unit_offset = unit_offset
        self.float_weight = float_weight or unit_offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.unit_offset:
            return (hidden_states * (1.0 + self.weight.float())).to(input_dtype)
        if self.float_weight:
            return (self.weight * hidden_states).to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)


def make_norm(config: MLAConfig, size: int) -> MLARMSNorm:
    return MLARMSNorm(size, config.rms_norm_eps, config.rms_norm_unit_offset, config.rms_norm_float_weight)


class MLAQueryNorm(nn.Module):
    """QK-norm of the queries: each head `[q_nope | q_pe]` is divided by the RMS of its no-RoPE part `q_nope` (the
    source's query head), over the head (`"head"`) or over all heads (`"projection"`), then multiplied by a gain
    per column (the source's gain, the softmax rescaling folded in)."""

    def __init__(self, config: MLAConfig, num_heads: int, nope_dim: int, rope_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, nope_dim + rope_dim))
        self.nope_dim, self.per_head = nope_dim, config.qk_norm == "head"
        self.variance_epsilon = config.rms_norm_eps

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # (B, T, H, dn + dr)
        input_dtype = q.dtype
        q = q.to(torch.float32)
        nope = q[..., : self.nope_dim]
        variance = nope.pow(2).mean(-1, keepdim=True) if self.per_head else nope.pow(2).mean((-2, -1), keepdim=True)
        return (self.weight * (q * torch.rsqrt(variance + self.variance_epsilon))).to(input_dtype)


class MLARotaryEmbedding(nn.Module):
    """The source model's rotary embedding (all `rotary_dim // 2` frequencies, one table per layer type when the
    RoPE parameters are per layer type); layers pick their subset. Returns half-width `cos`/`sin`."""

    def __init__(self, config: MLAConfig, device=None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        sets = config.rope_parameter_sets()
        self.nested = None not in sets
        self.rope_type = {} if self.nested else sets[None]["rope_type"]
        for layer_type, (inv_freq, scaling) in self._frequencies(device).items():
            prefix = f"{layer_type}_" if self.nested else ""
            if self.nested:
                self.rope_type[layer_type] = sets[layer_type].get("rope_type", "default")
            self.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)
            self.register_buffer(f"{prefix}original_inv_freq", inv_freq.clone(), persistent=False)
            setattr(self, f"{prefix}attention_scaling", scaling)

    def _frequencies(self, device=None) -> dict:
        """`{layer_type or None: (inv_freq, attention_scaling)}` at the trained length."""
        out = {}
        for layer_type, params in self.config.rope_parameter_sets().items():
            if params is None:
                continue
            rope_type = params.get("rope_type", "default")
            init_fn = self.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
            out[layer_type] = init_fn(self.config, device, **({"layer_type": layer_type} if self.nested else {}))
        return out

    @torch.no_grad()
    def reset_frequencies(self) -> None:
        """Recompute the (non-persistent) frequency buffers, e.g. after `from_pretrained` built them on meta."""
        for layer_type, (inv_freq, _) in self._frequencies().items():
            prefix = f"{layer_type}_" if self.nested else ""
            for name in (f"{prefix}inv_freq", f"{prefix}original_inv_freq"):
                getattr(self, name).copy_(inv_freq)

    @staticmethod
    def compute_default_rope_parameters(config: MLAConfig, device=None, layer_type=None, **kwargs):
        params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
        base = params["rope_theta"]
        dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
        prefix = f"{layer_type}_" if layer_type is not None else ""
        inv_freq, scaling = getattr(self, f"{prefix}inv_freq"), getattr(self, f"{prefix}attention_scaling")
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, d_rot/2)
        cos = freqs.cos() * scaling
        sin = freqs.sin() * scaling
        return cos.to(x.dtype), sin.to(x.dtype)  # half-width: one entry per frequency

    def all(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """`{layer_type: (cos, sin)}` (key None when the parameters are shared by all layers)."""
        if not self.nested:
            return {None: self(x, position_ids)}
        return {t: self(x, position_ids, layer_type=t) for t in self.rope_type}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MLAMLP(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _attend(query, key, value, mask, scale, dropout=0.0, eager=False, causal=True, softcap=None):
    """softmax(cap(q k^T * scale) + mask) v. `mask`: bool (True = attend) or additive float, broadcastable; None with
    `causal` = causal when the query block is longer than 1 (aligned to the end of the keys). `softcap`: scores
    become `softcap * tanh(scores / softcap)` (eager maths: SDPA has no soft cap)."""
    T, S = query.shape[-2], key.shape[-2]
    eager = eager or softcap is not None
    if not eager and mask is None and causal and T == S > 1:  # lets SDPA skip the masked blocks
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale, is_causal=True)
    if mask is None and causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    if not eager:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


class MLALatentLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` (ckv, r) and ``values`` (kpe, dr) are views of one ``[B, 1, capacity, r + dr]``
    buffer. ``latent`` is the filled part ``[ckv | kpe]``. When something else replaces ``keys`` (crop, beam
    reordering, reset), the next update rebuilds the buffer from them."""

    _buf = None
    _keys_view = None
    latent = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        r = key_states.shape[-1]
        new = torch.cat((key_states, value_states), dim=-1)  # (B, 1, T, r + dr)
        S, T = self.get_seq_length(), new.shape[-2]
        buf = self._buf if self.keys is self._keys_view else None
        if buf is None or S + T > buf.shape[-2]:
            prefix = (buf[..., :S, :] if buf is not None else torch.cat((self.keys, self.values), dim=-1)) if S else None
            grown = new.new_empty(*new.shape[:2], S + T + max(256, S // 4), new.shape[-1])  # amortized O(1) appends
            if prefix is not None:
                grown[..., :S, :] = prefix
            buf = grown
        buf[..., S:S + T, :] = new
        self._buf = buf
        self.latent = buf[..., : S + T, :]  # (B, 1, S + T, r + dr)
        self.keys, self.values = self.latent[..., :r], self.latent[..., r:]
        self._keys_view = self.keys
        return self.keys, self.values


def use_latent_layers(cache) -> None:
    """Swap the empty full-attention layers of a ``DynamicCache`` (e.g. the one ``generate`` makes) for
    ``MLALatentLayer``s; sliding-window layers and other caches are left as they are."""
    if isinstance(cache, DynamicCache):
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                cache.layers[i] = MLALatentLayer()


class MLAAttention(nn.Module):
    """DeepSeek-V3 attention without query compression: caches `ckv` (r) and the shared RoPE key `kpe` (d_rope)."""

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.layer_kv_lora_rank(layer_idx)
        self.qk_rope_head_dim = config.layer_rope_dim(layer_idx)
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scaling = self.qk_head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"

        self.attn_logit_softcapping = config.attn_logit_softcapping
        self.layer_type = config.layer_types[layer_idx] if config.rope_parameter_sets().keys() != {None} else None

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=config.attention_bias)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        if config.kv_a_layernorm:  # DeepSeek's latent norm (the DeepSeek-V3 serving format)
            self.kv_a_layernorm = MLARMSNorm(self.kv_lora_rank, eps=1e-6)
        if config.qk_norm is not None:
            # The source's normalized keys, projected into the cache: ckv | kpe += k_a_proj(k_norm(k_proj(x))).
            g, d_h = config.num_key_value_heads, config.head_dim
            self.k_proj = nn.Linear(config.hidden_size, g * d_h, bias=config.attention_bias)
            self.k_norm = make_norm(config, d_h if config.qk_norm == "head" else g * d_h)
            self.k_a_proj = nn.Linear(g * d_h, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
            self.q_norm = MLAQueryNorm(config, self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.o_proj_bias)
        # Frequencies of the kept RoPE pairs (indices into the source rotary embedding). A plain attribute, not a
        # buffer: from_pretrained materializes modules on the meta device and would leave a buffer uninitialized.
        self.rope_freq_list = list(config.rope_freq_indices[layer_idx])
        self._rope_index_cache = {}

    def _rope_index(self, device) -> torch.Tensor:
        idx = self._rope_index_cache.get(device)
        if idx is None:
            idx = torch.tensor(self.rope_freq_list, dtype=torch.long, device=device)
            self._rope_index_cache[device] = idx
        return idx

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split into the key up-projection ``(H, dn, r)`` and the transposed value up-projection
        ``(H, r, dv)``, contiguous; cached until the weight changes (its storage or version)."""
        w = self.kv_b_proj.weight
        H, dn, dv, r = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        if torch.is_grad_enabled() and w.requires_grad:  # training through the absorbed path: no cache
            w_kv = w.view(H, dn + dv, r)
            return w_kv[:, :dn], w_kv[:, dn:].transpose(1, 2)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = getattr(self, "_absorbed_cache", None)
        if cached is None or cached[0] != key:
            w_kv = w.detach().view(H, dn + dv, r)
            cached = (key, w_kv[:, :dn].contiguous(), w_kv[:, dn:].transpose(1, 2).contiguous())
            self._absorbed_cache = cached
        return cached[1], cached[2]

    def _use_absorbed(self, q_len: int) -> bool:
        mode = self.config.absorb
        if mode == "never":
            return False
        if mode == "always":
            return True
        return q_len <= self.config.absorb_max_query and not (torch.is_grad_enabled() and self.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ):
        B, T, _ = hidden_states.shape
        H, dn, dr, dv, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank

        q = self.q_proj(hidden_states).view(B, T, H, dn + dr)
        kv = self.kv_a_proj_with_mqa(hidden_states)  # (B, T, r + dr)
        if self.config.qk_norm is not None:
            q = self.q_norm(q)
            k = self.k_proj(hidden_states)  # (B, T, g*d_h)
            if self.config.qk_norm == "head":
                k = self.k_norm(k.view(B, T, -1, self.config.head_dim)).view(B, T, -1)
            else:
                k = self.k_norm(k)
            kv = kv + self.k_a_proj(k)
        q_nope, q_pe = q.transpose(1, 2).split([dn, dr], dim=-1)  # (B, H, T, dn), (B, H, T, dr)
        ckv, k_pe = kv.unsqueeze(1).split([r, dr], dim=-1)  # (B, 1, T, r), (B, 1, T, dr)
        if self.config.kv_a_layernorm:
            ckv = self.kv_a_layernorm(ckv)  # the cache holds the normalized latent

        if dr > 0:
            if isinstance(position_embeddings, dict):
                position_embeddings = position_embeddings[self.layer_type]
            cos, sin = position_embeddings  # (B, T, d_rot/2)
            idx = self._rope_index(cos.device)
            cos = torch.cat((cos[..., idx], cos[..., idx]), dim=-1).unsqueeze(1)  # (B, 1, T, dr)
            sin = torch.cat((sin[..., idx], sin[..., idx]), dim=-1).unsqueeze(1)
            q_pe = q_pe * cos + rotate_half(q_pe) * sin
            k_pe = k_pe * cos + rotate_half(k_pe) * sin

        latent = None
        if past_key_values is not None:
            ckv, k_pe = past_key_values.update(ckv.contiguous(), k_pe.contiguous(), self.layer_idx)  # (B, 1, S, .)
            layers = getattr(past_key_values, "layers", None)
            latent = getattr(layers[self.layer_idx], "latent", None) if layers is not None else None  # MLALatentLayer
        S = ckv.shape[-2]
        eager = self.config._attn_implementation == "eager"
        dropout = self.attention_dropout if self.training else 0.0
        mask = attention_mask[:, :, :, :S] if attention_mask is not None else None

        if self._use_absorbed(T):
            # Absorbed: attend over the latent directly, as one KV head of width r + dr with V = ckv.
            w_uk, w_uv_t = self._absorbed_weights()
            q_lat = torch.matmul(q_nope, w_uk)  # (B, H, T, dn) @ (H, dn, r) -> (B, H, T, r)
            query = torch.cat((q_lat, q_pe), dim=-1).reshape(B, 1, H * T, r + dr)  # heads folded into queries
            key = latent if latent is not None else torch.cat((ckv, k_pe), dim=-1)  # (B, 1, S, r + dr)
            if mask is None and T > 1:
                mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
            if mask is not None:
                mask = mask.expand(B, 1, T, S).unsqueeze(1).expand(B, 1, H, T, S).reshape(B, 1, H * T, S)
            out = _attend(query, key, key, mask, self.scaling, dropout, eager, causal=False,
                          softcap=self.attn_logit_softcapping)[..., :r]  # (B, 1, H*T, r)
            out = torch.matmul(out.reshape(B, H, T, r), w_uv_t)  # (B, H, T, r) @ (H, r, dv) -> (B, H, T, dv)
        else:
            # Decompressed: per-head keys and values from the latent.
            w_kv = self.kv_b_proj.weight.view(H, dn + dv, r)
            kv_full = F.linear(ckv, w_kv.reshape(H * (dn + dv), r)).view(B, S, H, dn + dv).transpose(1, 2)
            k_nope, value = kv_full.split([dn, dv], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
            key = torch.cat((k_nope, k_pe.expand(B, H, S, dr)), dim=-1)  # (B, H, S, dn + dr)
            query = torch.cat((q_nope, q_pe), dim=-1)
            if not eager and self.attn_logit_softcapping is None and dv != dn + dr:
                # SDPA falls back to its slow math kernel (full T x S scores) when q/k and v widths differ:
                # zero-pad the narrower side to one width, which changes no score and no output column.
                w = max(dv, dn + dr)
                query, key = F.pad(query, (0, w - dn - dr)), F.pad(key, (0, w - dn - dr))
                value = F.pad(value, (0, w - dv))
            out = _attend(query, key, value, mask, self.scaling, dropout, eager,
                          softcap=self.attn_logit_softcapping)[..., :dv]  # (B, H, T, dv)

        out = out.transpose(1, 2).reshape(B, T, H * dv)
        return self.o_proj(out), None


class MLADecoderLayer(GradientCheckpointingLayer):
    """One block, its norms where the source family has them (`config.norm_layout`):
    - `pre`: `h = x + m * attn(input_layernorm(x))`, `h + m * mlp(post_attention_layernorm(h))` (Llama, Granite's
      residual multiplier `m`);
    - `sandwich`: `h = x + post_attention_layernorm(attn(input_layernorm(x)))`,
      `h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))` (Gemma 2/3);
    - `post`: `h = x + post_attention_layernorm(attn(x))`, `h + post_feedforward_layernorm(mlp(h))` (OLMo 2)."""

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAAttention(config, layer_idx)
        self.mlp = MLAMLP(config)
        self.layout = config.norm_layout
        self.residual_multiplier = config.residual_multiplier
        d = config.hidden_size
        if self.layout in ("pre", "sandwich"):
            self.input_layernorm = make_norm(config, d)
        self.post_attention_layernorm = make_norm(config, d)
        if self.layout == "sandwich":
            self.pre_feedforward_layernorm = make_norm(config, d)
        if self.layout in ("sandwich", "post"):
            self.post_feedforward_layernorm = make_norm(config, d)
        self.attention_type = config.layer_types[layer_idx]

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        if self.layout != "post":
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
        )
        if self.layout == "pre":
            hidden_states = residual + hidden_states * self.residual_multiplier
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * self.residual_multiplier
        hidden_states = residual + self.post_attention_layernorm(hidden_states)
        mlp_in = self.pre_feedforward_layernorm(hidden_states) if self.layout == "sandwich" else hidden_states
        return hidden_states + self.post_feedforward_layernorm(self.mlp(mlp_in))


class MLAPreTrainedModel(PreTrainedModel):
    config_class = MLAConfig
    config: MLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module):
        if isinstance(module, MLARotaryEmbedding):  # buffers per layer type are unknown to the generic init
            module.reset_frequencies()
            return
        super()._init_weights(module)


class MLAModel(MLAPreTrainedModel):
    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MLADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = MLARotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.embedding_multiplier != 1.0:  # Gemma / Granite: in the embedding dtype
                inputs_embeds = inputs_embeds * torch.tensor(self.config.embedding_multiplier, dtype=inputs_embeds.dtype)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if use_cache:
            use_latent_layers(past_key_values)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        masks = {"full_attention": None, "sliding_attention": None}
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb.all(hidden_states, position_ids)
        if None in position_embeddings:
            position_embeddings = position_embeddings[None]
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer.attention_type],
                past_key_values=past_key_values if use_cache else None,
                position_embeddings=position_embeddings,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )


class MLAForCausalLM(MLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLAConfig):
        super().__init__(config)
        self.model = MLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', V)
        if self.config.logits_scaling != 1.0:  # Granite
            logits = logits / self.config.logits_scaling
        if self.config.final_logit_softcapping is not None:  # Gemma 2
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
        if return_dict is False:
            return output.to_tuple()
        return output


__all__ = ["MLAPreTrainedModel", "MLAModel", "MLAForCausalLM"]
