"""Multi-head Latent Attention (DeepSeek-V2/V3 style) for models retrofitted from MHA/GQA/MQA checkpoints.

Self-contained remote code: imports only torch and transformers. Module and weight names follow transformers'
``modeling_deepseek_v3.py`` (``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``).

Per layer the cache holds the latent ``ckv`` as ``[B, 1, T, kv_lora_rank]`` and the shared RoPE key ``kpe`` as
``[B, 1, T, qk_rope_head_dim]`` (the "keys" and "values" slots of a transformers ``Cache``). In a ``DynamicCache``
both live side by side in one buffer that grows geometrically (``MLALatentLayer``): a decode step writes one token
instead of copying the whole cache, and absorbed attention reads ``[ckv | kpe]`` without concatenating them. In a
``StaticCache`` (``generate(cache_implementation="static")``, ``torch.compile``, CUDA graphs) ``MLAStaticLayer`` holds
the same in one fixed buffer.

Runs on transformers 5.23 to 5.25 (``configuration_mla.TESTED_TRANSFORMERS``): the cache is taken as ``cache=``
(5.24+) or ``past_key_values=`` and returned under the name the running version reads.
"""

import inspect
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # when loaded as remote code (a package of its own)
    from .configuration_mla import MLAConfig  # checks the transformers version on import
except ImportError:  # pragma: no cover - when imported as a plain module
    from configuration_mla import MLAConfig
# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old names still
# work, with a deprecation warning, until 5.40): speak the running version's names, accept both.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


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
        if input_dtype == torch.float32 and self.weight.dtype == torch.float32 and not self.unit_offset:
            # the same maths as below when nothing is cast, run from C++ (faster than six ops from Python)
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
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
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
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


class LayerRope(NamedTuple):
    """One layer's RoPE: `cos` and signed `sin` (`[-sin | sin]`) of its kept frequencies, each (B, T, d_rope)."""

    cos: torch.Tensor
    sin: torch.Tensor


def gather_rope(cos: torch.Tensor, sin: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor) -> LayerRope:
    """The half-width tables (B, T, d_rot/2) at `idx` (`[i | i]` per kept frequency), `sin` times `sign`."""
    return LayerRope(cos[..., idx], sin[..., idx] * sign.to(sin.dtype))


def rope_index(freq_lists, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices `[f | f]` and signs `[-1.. | +1..]` into a half-width table for each list of frequencies `f`."""
    idx = [i for freqs in freq_lists for i in list(freqs) + list(freqs)]
    sign = [s for freqs in freq_lists for s in [-1.0] * len(freqs) + [1.0] * len(freqs)]
    return torch.tensor(idx, dtype=torch.long, device=device), torch.tensor(sign, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout, `x * cos + rotate_half(x) * sin`, with `sin` already signed as
    `[-sin | sin]` (see `MLAModel._rope_tables`): `rotate_half(x) * sin == roll(x, half) * [-sin | sin]`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class MLAMLP(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                            **kwargs):
    """softmax(cap(q k^T * scaling) + mask) v with the attention interface's shapes: q (B, H, T, D), k/v (B, H, S, .),
    `attention_mask` bool (True = attend) or additive, broadcastable to (B, H, T, S); None = causal when T > 1
    (aligned to the end of the keys). Returns (B, T, H, Dv) and the probabilities."""
    T, S = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None and T > 1:
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def mask_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An sdpa (bool, True = attend) or eager (additive) 4D mask as an additive bias (B, 1, T, S) in `dtype`."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


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
        S, T = self.get_seq_length(), key_states.shape[-2]
        buf = self._buf if self.keys is self._keys_view else None
        if buf is None or S + T > buf.shape[-2]:
            prefix = (buf[..., :S, :] if buf is not None else torch.cat((self.keys, self.values), dim=-1)) if S else None
            width = r + value_states.shape[-1]
            grown = key_states.new_empty(*key_states.shape[:2], S + T + max(256, S // 4), width)  # amortized O(1)
            if prefix is not None:
                grown[..., :S, :] = prefix
            buf = grown
        buf[..., S:S + T, :r] = key_states
        buf[..., S:S + T, r:] = value_states
        self._buf = buf
        self.latent = buf[..., : S + T, :]  # (B, 1, S + T, r + dr)
        self.keys, self.values = self.latent[..., :r], self.latent[..., r:]
        self._keys_view = self.keys
        return self.keys, self.values


class MLAStaticLayer(StaticLayer):
    """A ``StaticLayer`` (fixed addresses for ``torch.compile`` / CUDA graphs) whose ``keys`` (ckv) and ``values``
    (kpe) are views of one ``[B, 1, max_cache_len, r + dr]`` buffer, ``latent``; the inherited ``update`` writes the
    new tokens into the views in place. Made by ``use_latent_layers`` for ``generate(cache_implementation="static")``
    or a ``StaticCache`` passed in."""

    _buf = None
    _keys_view = None

    @property
    def latent(self):
        return self._buf if self.keys is self._keys_view else None  # None once something replaced the keys

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, r, dr = key_states.shape[0], key_states.shape[-1], value_states.shape[-1]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads, self.k_head_dim, self.v_head_dim = B, 1, r, dr
        self._buf = torch.zeros(B, 1, self.max_cache_len, r + dr, dtype=key_states.dtype, device=self.device)
        self.keys, self.values = self._buf[..., :r], self._buf[..., r:]
        self._keys_view = self.keys
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self._buf, self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True


def use_latent_layers(cache) -> None:
    """Swap the empty full-attention layers of a ``DynamicCache`` or ``StaticCache`` (e.g. the one ``generate``
    makes) for ``MLALatentLayer`` / ``MLAStaticLayer``; sliding-window layers and other caches are left as they are."""
    if isinstance(cache, (DynamicCache, StaticCache)):
        for i, layer in enumerate(cache.layers):
            if not layer.is_initialized:
                if type(layer) is DynamicLayer:
                    cache.layers[i] = MLALatentLayer()
                elif type(layer) is StaticLayer:
                    cache.layers[i] = MLAStaticLayer(max_cache_len=layer.max_cache_len)


class MLAAttention(nn.Module):
    """DeepSeek-V3 attention without query compression: caches `ckv` (r) and the shared RoPE key `kpe` (d_rope).

    Two paths, the same maths: *absorbed* (decoding: all heads attend over the cached latent, the key up-projection
    applied to the query and the value up-projection after the weighted sum; batched matmuls on a GPU, one SDPA call
    with keys = values = the latent on a CPU, `config.absorbed_attention`) and
    *decompressed* (prefill, training: per-head keys and values through transformers' attention interface, widths
    padded to one multiple of 8 so the fused SDPA / flash kernels apply and no T x S score matrix is built)."""

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1  # keys and values are decompressed per query head
        self.kv_lora_rank = config.layer_kv_lora_rank(layer_idx)
        self.qk_rope_head_dim = config.layer_rope_dim(layer_idx)
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scaling = self.qk_head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None

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
        # Frequencies of the kept RoPE pairs (indices into the source rotary embedding); MLAModel gathers the cos/sin
        # of every layer once per forward.
        self.rope_freq_list = list(config.rope_freq_indices[layer_idx])
        self._rope_index_cache = {}
        self.has_k_proj = config.qk_norm is not None
        self._down_sizes = [m.out_features for m in self._down_modules()]
        self._register_state_dict_hook(self._unshare_state_dict)

    def layer_rope(self, position_embeddings) -> LayerRope:
        """This layer's `LayerRope` from the model's rotary tables (half-width `(cos, sin)`, or a dict of them per
        layer type), for callers that run a layer on its own; `MLAModel` gathers all layers at once instead."""
        if isinstance(position_embeddings, dict):
            position_embeddings = position_embeddings[self.layer_type]
        cos, sin = position_embeddings
        if cos.device not in self._rope_index_cache:
            self._rope_index_cache[cos.device] = rope_index([self.rope_freq_list], cos.device)
        return gather_rope(cos, sin, *self._rope_index_cache[cos.device])

    def _down_modules(self) -> list:
        """The projections that read the block's input: ``q_proj``, ``kv_a_proj_with_mqa`` (and QK-norm's ``k_proj``)."""
        return [self.q_proj, self.kv_a_proj_with_mqa] + ([self.k_proj] if self.has_k_proj else [])

    def _down(self, hidden_states: torch.Tensor) -> tuple:
        """``(q, kv, k)`` of the input (``k`` None without QK-norm): one GEMM over the fused weights where
        ``_fused_down`` gives them, else each module in turn (training, adapters, hooks, ``torch.compile``)."""
        fused = self._fused_down(hidden_states.device)
        if fused is None:
            q, kv = self.q_proj(hidden_states), self.kv_a_proj_with_mqa(hidden_states)
            return q, kv, self.k_proj(hidden_states) if self.has_k_proj else None
        outs = F.linear(hidden_states, *fused).split(self._down_sizes, dim=-1)
        return outs[0], outs[1], outs[2] if self.has_k_proj else None

    def _fused_down(self, device) -> Optional[tuple]:
        """``(weight, bias)`` of the down-projections stacked, or None where they must run one by one. Built at the
        first inference forward (and again whenever a weight was replaced, e.g. by ``.to()``); the modules' weights
        then become views of it, so the fusion costs no memory and the checkpoint keeps its tensor names (the state
        dict holds copies, see ``_unshare_state_dict``). Gradients, adapters (any module that is not a plain
        ``nn.Linear``), hooks, offloading and ``torch.compile`` take the modules (``config.fused_down_projection``:
        ``auto`` fuses off the CPU only)."""
        fused = self.__dict__.get("_fused")
        if fused is not None and [m.weight.data_ptr() for m in self._down_modules()] != fused[2]:
            del self.__dict__["_fused"]  # the weights were replaced (.to(), a load): the old stack is let go
            fused = None
        mode = self.config.fused_down_projection
        if mode == "never" or mode == "auto" and device.type == "cpu" or torch.compiler.is_compiling():
            return None
        modules = self._down_modules()
        for m in modules:
            if type(m) is not nn.Linear or type(m.weight) is not nn.Parameter or m.weight.is_meta:
                return None
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                return None
            if m.weight.requires_grad and torch.is_grad_enabled():
                return None
        if fused is None:
            fused = self._fuse(modules)
        return fused[0], fused[1]

    @torch.inference_mode(False)
    @torch.no_grad()
    def _fuse(self, modules: list) -> tuple:
        """Stack the modules' weights (and biases) into one tensor and make theirs views of it."""
        weight = torch.cat([m.weight for m in modules])  # (sum of outputs, d)
        bias = torch.cat([m.bias for m in modules]) if modules[0].bias is not None else None
        start = 0
        for m, size in zip(modules, self._down_sizes):
            m.weight.data = weight[start:start + size]
            if bias is not None:
                m.bias.data = bias[start:start + size]
            start += size
        self.__dict__["_fused"] = (weight, bias, [m.weight.data_ptr() for m in modules])  # not a buffer: no state
        return self.__dict__["_fused"]

    @staticmethod
    def _unshare_state_dict(module, state_dict, prefix, local_metadata) -> None:
        """State dict hook: down-projection tensors that share memory (views of the fused stack) are handed out as
        copies of their own (savers such as safetensors refuse shared tensors); parameters asked for as such
        (``keep_vars``) stay."""
        names = [f"{prefix}{m}.{p}" for m in ("q_proj", "kv_a_proj_with_mqa", "k_proj") for p in ("weight", "bias")]
        names = [n for n in names if n in state_dict and type(state_dict[n]) is not nn.Parameter]
        ptrs = [state_dict[n].untyped_storage().data_ptr() for n in names]
        for name, ptr in zip(names, ptrs):
            if ptrs.count(ptr) > 1:
                state_dict[name] = state_dict[name].clone()

    def use_absorbed(self, q_len: int) -> bool:
        mode = self.config.absorb
        if mode == "never":
            return False
        if mode == "always":
            return True
        return q_len <= self.config.absorb_max_query and not (torch.is_grad_enabled() and self.training)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``kv_b_proj``: the key up-projection ``(H, dn, r)`` and the value up-projection ``(H, dv, r)``."""
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w_kv[:, : self.qk_nope_head_dim], w_kv[:, self.qk_nope_head_dim :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        **kwargs,
    ):
        B, T, _ = hidden_states.shape
        H, dn, dr, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank

        q, kv, k = self._down(hidden_states)  # (B, T, H*(dn + dr)), (B, T, r + dr), (B, T, g*d_h) or None
        q = q.view(B, T, H, dn + dr)
        if self.config.qk_norm is not None:
            q = self.q_norm(q)
            if self.config.qk_norm == "head":
                k = self.k_norm(k.view(B, T, -1, self.config.head_dim)).view(B, T, -1)
            else:
                k = self.k_norm(k)
            kv = kv + self.k_a_proj(k)
        q_nope, q_pe = q.split([dn, dr], dim=-1)  # (B, T, H, dn), (B, T, H, dr)
        ckv, k_pe = kv.unsqueeze(1).split([r, dr], dim=-1)  # (B, 1, T, r), (B, 1, T, dr)
        if self.config.kv_a_layernorm:
            ckv = self.kv_a_layernorm(ckv)  # the cache holds the normalized latent
        if dr > 0:
            if not isinstance(position_embeddings, LayerRope):
                position_embeddings = self.layer_rope(position_embeddings)
            cos, sin = position_embeddings  # (B, T, dr): this layer's frequencies, sin signed
            q_pe = apply_rope(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))
            k_pe = apply_rope(k_pe, cos.unsqueeze(1), sin.unsqueeze(1))

        latent = None
        if cache is not None:
            ckv, k_pe = cache.update(ckv, k_pe, self.layer_idx)  # (B, 1, S, r), (B, 1, S, dr)
            latent = getattr(cache.layers[self.layer_idx], "latent", None)  # [ckv | kpe] of our cache layers
        if self.use_absorbed(T):
            out = self._absorbed(q_nope, q_pe, ckv[:, 0], k_pe[:, 0], latent, attention_mask)
        else:
            out = self._decompressed(q_nope, q_pe, ckv[:, 0], k_pe[:, 0], attention_mask)
        return self.o_proj(out), None

    def _absorbed(self, q_nope, q_pe, ckv, k_pe, latent, bias):
        """Attention of all heads over the latent: scores `q_nope W_UK ckv^T + q_pe kpe^T` as batched matmuls in the
        model's dtype (softmax accumulated in float32 inside its kernel), then `(p ckv) W_UV`. `bias`: additive
        (B, 1, T, S) or None. q_nope (B, T, H, dn), q_pe (B, T, H, dr), ckv (B, S, r), k_pe (B, S, dr)."""
        B, T, H, _ = q_nope.shape
        r, dv, S = self.kv_lora_rank, self.v_head_dim, ckv.shape[-2]
        w_uk, w_uv = self._up_weights()  # (H, dn, r), (H, dv, r)
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, -1), w_uk)  # (H, B*T, r)
        q_lat = q_lat.view(H, B, T, r).permute(1, 2, 0, 3)  # (B, T, H, r), a view
        if bias is None and T > 1:  # transformers skipped the mask: the queries are the first T tokens, causal
            allowed = torch.ones(T, S, dtype=torch.bool, device=ckv.device).tril()  # keys past T: empty slots
            bias = torch.zeros(T, S, dtype=q_lat.dtype, device=ckv.device)
            bias = bias.masked_fill_(~allowed, torch.finfo(bias.dtype).min)[None, None]  # (1, 1, T, S)
        if latent is not None and self._fused_absorbed(ckv.device):
            return self._absorbed_sdpa(q_lat, q_pe, latent[:, :, :S], bias, w_uv)
        if latent is not None:  # one matmul over the contiguous [ckv | kpe]
            query = torch.cat((q_lat, q_pe), dim=-1).mul_(self.scaling).view(B, T * H, -1)  # (B, T*H, r + dr)
            scores = torch.bmm(query, latent[:, 0, :S].transpose(1, 2))  # (B, T*H, S)
        else:  # keys and values held apart (another cache)
            scores = torch.bmm((q_pe * self.scaling).reshape(B, T * H, -1), k_pe.transpose(1, 2))
            scores = torch.baddbmm(scores, (q_lat * self.scaling).reshape(B, T * H, r), ckv.transpose(1, 2))
        scores = scores.view(B, T, H, S)
        if self.attn_logit_softcapping is not None:
            cap = self.attn_logit_softcapping
            scores = torch.tanh(scores / cap) * cap
        if bias is not None:
            scores = scores + bias[:, 0, :, None, :S]  # (B, T, 1, S) broadcast over heads
        probs = torch.softmax(scores, dim=-1)  # (B, T, H, S)
        if self.training and self.attention_dropout > 0:
            probs = F.dropout(probs, p=self.attention_dropout)
        out = torch.bmm(probs.view(B, T * H, S), ckv)  # (B, T*H, r)
        out = torch.bmm(out.view(B * T, H, r).transpose(0, 1), w_uv.transpose(1, 2))  # (H, B*T, dv)
        return out.transpose(0, 1).reshape(B, T, H * dv)

    def _fused_absorbed(self, device) -> bool:
        """Whether the absorbed decode runs as one fused SDPA call over the latent rather than batched matmuls
        (`config.absorbed_attention`). `auto`: SDPA on a CPU, where its flash kernel takes any head width and reads
        the latent once (SmolLM2 at 0.3125 on 2 cores: 15% faster than the matmuls at batch 8 after 4096 tokens, as
        fast at batch 1 after 4096 and 8192, where a lone sequence's kernel runs on one thread but the matmuls read
        the latent twice); the matmuls on a GPU (SDPA's fused kernels do not take heads over 256 wide and cuDNN
        plans anew as the cache grows)."""
        mode = self.config.absorbed_attention
        return self.attn_logit_softcapping is None and (mode == "sdpa" or mode == "auto" and device.type == "cpu")

    def _absorbed_sdpa(self, q_lat, q_pe, latent, bias, w_uv):
        """The absorbed attention as one SDPA call: all heads folded into the query axis of a single head of width
        r + dr, keys and values both the latent (B, 1, S, r + dr); the output's first r columns are `p ckv`."""
        B, T, H, r = q_lat.shape
        S = latent.shape[-2]
        query = torch.cat((q_lat, q_pe), dim=-1).view(B, 1, T * H, -1)  # rows (t, h)
        if bias is not None and T > 1:
            bias = bias[..., :S].unsqueeze(3).expand(-1, 1, T, H, S).reshape(-1, 1, T * H, S)
        elif bias is not None:
            bias = bias[..., :S]  # (B, 1, 1, S): the same for every head
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, latent, latent, attn_mask=bias, dropout_p=dropout,
                                             scale=self.scaling)[..., :r]  # (B, 1, T*H, r)
        out = torch.bmm(out.reshape(B * T, H, r).transpose(0, 1), w_uv.transpose(1, 2))  # (H, B*T, dv)
        return out.transpose(0, 1).reshape(B, T, H * self.v_head_dim)

    def _decompressed(self, q_nope, q_pe, ckv, k_pe, mask):
        """Per-head keys `[ckv W_UK | kpe]` and values `ckv W_UV`, attended through transformers' attention
        interface (`config._attn_implementation`); the soft cap and `eager` use the eager maths."""
        B, T, H, dn = q_nope.shape
        dr, dv, S = self.qk_rope_head_dim, self.v_head_dim, ckv.shape[-2]
        kv = F.linear(ckv, self.kv_b_proj.weight).view(B, S, H, dn + dv)
        k_nope, value = kv.split([dn, dv], dim=-1)  # (B, S, H, dn), (B, S, H, dv)
        impl = self.config._attn_implementation
        if impl == "eager" or self.attn_logit_softcapping is not None and impl == "sdpa":
            attend, pad = eager_attention_forward, 0
        else:
            attend = ALL_ATTENTION_FUNCTIONS[impl]
            pad = -(-max(dn + dr, dv) // 8) * 8  # one width, a multiple of 8: the fused kernels apply
        width = max(pad, dn + dr)
        query = torch.cat((q_nope, q_pe, q_nope.new_zeros(B, T, H, width - dn - dr)), dim=-1)
        key = torch.cat((k_nope, k_pe[:, :, None].expand(B, S, H, dr), k_nope.new_zeros(B, S, H, width - dn - dr)), -1)
        if pad > dv:
            value = torch.cat((value, value.new_zeros(B, S, H, pad - dv)), dim=-1)
        out, _ = attend(
            self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
            softcap=self.attn_logit_softcapping, sliding_window=self.sliding_window,
        )  # (B, T, H, width)
        return out[..., :dv].reshape(B, T, H * dv)


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

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        if self.layout != "post":
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache
        )
        if self.layout == "pre":
            hidden_states = residual + self._scaled(hidden_states)
            return hidden_states + self._scaled(self.mlp(self.post_attention_layernorm(hidden_states)))
        hidden_states = residual + self.post_attention_layernorm(hidden_states)
        mlp_in = self.pre_feedforward_layernorm(hidden_states) if self.layout == "sandwich" else hidden_states
        return hidden_states + self.post_feedforward_layernorm(self.mlp(mlp_in))


class MLAPreTrainedModel(PreTrainedModel):
    config_class = MLAConfig
    config: MLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = True

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
        # Per rotary table: the layers that read it and all their frequency indices, [idx | idx] per layer, gathered
        # in one go per forward (not per layer). A plain attribute, not a buffer: from_pretrained builds modules on
        # the meta device and would leave a buffer uninitialized; the index tensor is made once per device.
        self._rope_plan = {}
        for layer in self.layers:
            attn = layer.self_attn
            if attn.qk_rope_head_dim:
                self._rope_plan.setdefault(attn.layer_type, []).append((attn.layer_idx, attn.rope_freq_list))
        self._rope_index_cache = {}
        self.post_init()

    def _rope_tables(self, hidden_states, position_ids) -> list:
        """Per layer its `LayerRope` (None for a layer without RoPE), gathered with one index per rotary table."""
        tables = self.rotary_emb.all(hidden_states, position_ids)  # {table: (cos, sin)}, half width (B, T, d_rot/2)
        out = [None] * len(self.layers)
        for table, layers in self._rope_plan.items():
            cos, sin = tables[table]
            key = (table, cos.device)
            if key not in self._rope_index_cache:
                self._rope_index_cache[key] = rope_index([freqs for _, freqs in layers], cos.device)
            cos, sin = gather_rope(cos, sin, *self._rope_index_cache[key])  # (B, T, sum of d_rope)
            widths = [2 * len(freqs) for _, freqs in layers]
            for (i, _), c, s in zip(layers, cos.split(widths, dim=-1), sin.split(widths, dim=-1)):
                out[i] = LayerRope(c, s)
        return out

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids, absorbed: bool) -> dict:
        """`{layer type: mask}` for the attention interface, or, on the absorbed path, additive biases (B, 1, T, S).
        `attention_mask` may already be such a dict (`generate` prepares them for a static cache)."""
        if isinstance(attention_mask, dict):
            masks = dict(attention_mask)
            return {k: mask_bias(m, inputs_embeds.dtype) for k, m in masks.items()} if absorbed else masks
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                       CACHE_ARG: cache, "position_ids": position_ids}
        masks = {}
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        if absorbed:
            masks = {k: mask_bias(m, inputs_embeds.dtype) for k, m in masks.items()}
        return masks

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`cache` (transformers >= 5.24) and `past_key_values` (5.23, and older callers) are the same argument."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.embedding_multiplier != 1.0:  # Gemma / Granite: in the embedding dtype
                inputs_embeds = inputs_embeds * torch.tensor(self.config.embedding_multiplier, dtype=inputs_embeds.dtype,
                                                              device=inputs_embeds.device)
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            use_latent_layers(cache)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        absorbed = self.layers[0].self_attn.use_absorbed(inputs_embeds.shape[1])
        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids, absorbed)
        hidden_states = inputs_embeds
        rope = self._rope_tables(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        for layer, layer_rope in zip(self.layers, rope):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer.attention_type],
                cache=cache,
                position_embeddings=layer_rope,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache}
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
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`cache` (transformers >= 5.24) and `past_key_values` (5.23) are the same argument; the output holds the
        cache under the name the running transformers reads (`cache` or `past_key_values`)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
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
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )
        if return_dict is False:
            return output.to_tuple()
        return output


__all__ = ["MLAPreTrainedModel", "MLAModel", "MLAForCausalLM"]
