"""The DeepSeek-V3 serving format (``--format deepseek_v3``): a stock ``model_type: deepseek_v3`` checkpoint.

transformers' ``DeepseekV3ForCausalLM`` (and, by their loaders, vLLM and SGLang; see
``docs/deepseek-v3-serving-research.md``) run MLA natively, under constraints an MLA model must meet first:
- one ``kv_lora_rank`` and one ``qk_rope_head_dim`` for all layers, no query compression, no biases, a Llama-style
  decoder (pre-norms, SiLU MLP, no QK-norm, multipliers, soft caps or sliding windows), every layer dense;
- the latent is always normalised (``kv_a_layernorm``): a transform of the latent that keeps its per-token RMS
  nearly constant and an up-projection refitted to the normalised latent, both on calibration tokens
  (``factorize.normalised_latent``);
- RoPE frequencies ``theta'^(-2j / r)`` (``r = qk_rope_head_dim``, ``rope_type: default``): the kept source
  frequencies must be every ``c``-th one (``0, c, 2c, ...``), one rotated component each; then
  ``theta' = theta^(c r / d_h)``. Only source frequencies equal to ``theta^(-2i / d_h)`` with no attention scaling
  qualify (all of plain RoPE; the fast band that Llama 3's ``llama3`` scaling leaves unchanged);
- interleaved RoPE pairs (vLLM ignores ``rope_interleave``): the RoPE rows of ``q_proj`` and ``kv_a_proj_with_mqa``
  are permuted from rotate-half ``[re | im]`` to ``(re_j, im_j)`` pairs;
- the softmax scale ``(qk_nope_head_dim + qk_rope_head_dim)^-1/2`` (ours already).

The conversion builds our MLA model under these constraints (``allocate.LayerConverter`` with ``strided``), verifies
it, then ``write_deepseek_v3`` rewrites the folder as the stock format. ``load_mla`` reads either format back into
our ``MLAForCausalLM`` (what ``mla finetune`` trains). Anything the format cannot express is an MLAError naming why.
"""

import json
import os
from pathlib import Path

import torch

from mla_modeling.configuration_mla import MLAConfig
from mla_modeling.modeling_mla import MLAForCausalLM, MLARotaryEmbedding

from .errors import MLAError
from .readers import SafetensorsReader
from .save import REMOTE_CODE_FILES, ShardWriter

FORMATS = ("mla", "deepseek_v3")
ROPE_METHODS = ("rotate", "rotate-norm")  # a rotated component per frequency: the best one is kept


def _decoder_problems(get) -> list[str]:
    """What a Llama-style DeepSeek decoder cannot express; ``get(name, default)`` reads an MLAConfig field."""
    unsupported = {
        "attention biases (q/k/v/o_proj)": get("attention_bias", False) or get("o_proj_bias", False),
        "MLP biases": get("mlp_bias", False),
        "QK-norm": get("qk_norm", None) is not None,
        f"the norm layout {get('norm_layout', 'pre')!r}": get("norm_layout", "pre") != "pre",
        "(1 + w) or float32 norm gains": get("rms_norm_unit_offset", False) or get("rms_norm_float_weight", False),
        "embedding / residual / logit multipliers": (get("embedding_multiplier", 1.0), get("residual_multiplier", 1.0),
                                                     get("logits_scaling", 1.0)) != (1.0, 1.0, 1.0),
        "soft caps": get("attn_logit_softcapping", None) is not None or get("final_logit_softcapping", None) is not None,
        f"the activation {get('hidden_act', 'silu')!r}": get("hidden_act", "silu") != "silu",
    }
    return [what for what, present in unsupported.items() if present]


def plain_frequencies(inv_freq: list[float], scaling: float, params: dict, rotary_dim: int) -> set[int]:
    """Indices of the source frequencies a ``rope_type: default`` RoPE can carry: equal to ``theta^(-2i/d_rot)``
    (``theta`` the source's ``rope_theta``) with no attention scaling. Length-dependent (dynamic) RoPE has none."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "dynamic" or scaling != 1.0:
        return set()
    theta = float(params.get("rope_theta", 10000.0))
    return {i for i, f in enumerate(inv_freq) if abs(f - theta ** (-2 * i / rotary_dim)) <= 1e-6 * f}


def strides(eligible: set[int], half: int, n_pairs: int) -> list[int]:
    """Strides ``c`` whose frequencies ``0, c, ..., (n_pairs - 1) c`` all exist and are ``eligible``."""
    if n_pairs <= 1:
        return [1] if 0 in eligible or n_pairs == 0 else []
    return [c for c in range(1, half) if (n_pairs - 1) * c < half and
            all(j * c in eligible for j in range(n_pairs))]


def check_layout(layout, cfg) -> set[int]:
    """Before any work: the RoPE frequencies the format can carry for this source, else MLAError naming what the
    deepseek_v3 format cannot express (``cfg``: the ConvertConfig)."""
    fields = {**layout.decoder, "attention_bias": layout.qkv_bias, "o_proj_bias": layout.o_bias,
              "mlp_bias": layout.mlp_bias, "qk_norm": layout.qk_norm}  # the export's MLAConfig fields
    problems = _decoder_problems(lambda k, d: fields.get(k, d))
    if layout.sliding_window or "sliding_attention" in layout.layer_types:
        problems.append("sliding-window attention")
    if layout.rotary_dim != layout.head_dim:
        problems.append("partial rotary embeddings")
    if any(layout.layer_rotary_dim(i) == 0 for i in range(layout.num_layers)):
        problems.append("layers without RoPE")
    if None not in layout.frequencies:
        problems.append("RoPE parameters per layer type")
    if problems:
        raise MLAError(f"--format deepseek_v3 cannot express {problems[0]} of this {layout.model_type} model "
                       "(stock DeepSeek-V3 is a Llama-style decoder without biases)")
    if cfg.rope_method not in ROPE_METHODS:
        raise MLAError(f"--format deepseek_v3 keeps one rotated RoPE component per frequency: use --rope-method "
                       f"{' or '.join(ROPE_METHODS)}, not {cfg.rope_method!r}")
    if cfg.factor_method == "svd":
        raise MLAError("--format deepseek_v3 fits the latent norm on calibration data: use --factor-method fisher or "
                       "pca, not svd")
    inv_freq, scaling = layout.frequencies[None]
    eligible = plain_frequencies(inv_freq, scaling, layout.rope_parameters, layout.rotary_dim)
    if 0 not in eligible:
        rope_type = layout.rope_parameters.get("rope_type", "default")
        raise MLAError(f"--format deepseek_v3 needs plain RoPE frequencies theta^(-2i/d); the rope_type {rope_type!r} "
                       "of this model changes all of them (vLLM would run them as DeepSeek YaRN)")
    return eligible


def deepseek_theta(theta: float, stride: int, rope: int, head_dim: int) -> float:
    """``theta'`` of a ``rope``-wide DeepSeek RoPE whose frequencies are every ``stride``-th of the source's."""
    return theta ** (stride * rope / head_dim)


def _uniform(name: str, values: list[int]) -> int:
    if len(set(values)) != 1:
        raise MLAError(f"the deepseek_v3 format needs one {name} for all layers, this model has {sorted(set(values))}")
    return values[0]


def rope_stride(config) -> int:
    """The stride ``c`` of an ``MLAConfig``'s first layer's RoPE frequencies ``0, c, 2c, ...`` (1 for one pair)."""
    indices = config.rope_freq_indices[0]
    return indices[1] - indices[0] if len(indices) > 1 else 1


def check_deepseek_v3(config) -> tuple[int, int, float]:
    """``(kv_lora_rank, qk_rope_head_dim, rope_theta)`` of an ``MLAConfig`` the format can express, else MLAError."""
    if not config.kv_a_layernorm:
        raise MLAError("the deepseek_v3 format always normalises the latent (kv_a_layernorm); this model has no "
                       "latent norm (convert it with --format deepseek_v3)")
    n = config.num_hidden_layers
    rank = _uniform("kv_lora_rank", [config.layer_kv_lora_rank(i) for i in range(n)])
    rope = _uniform("qk_rope_head_dim", [config.layer_rope_dim(i) for i in range(n)])
    if rope == 0 or rope > config.head_dim:
        raise MLAError(f"the deepseek_v3 format needs a RoPE width between 2 and head_dim {config.head_dim}, not {rope}")
    stride = rope_stride(config)
    want = [j * stride for j in range(rope // 2)]
    if stride < 1 or any(list(idx) != want for idx in config.rope_freq_indices):
        raise MLAError("the deepseek_v3 format needs the same RoPE frequencies 0, c, 2c, ... (every c-th) in every "
                       f"layer; this model has {config.rope_freq_indices[0]} in layer 0")
    problems = _decoder_problems(lambda k, d: getattr(config, k, d))
    if "sliding_attention" in config.layer_types:
        problems.append("sliding-window attention")
    if problems:
        raise MLAError(f"the deepseek_v3 format cannot express {problems[0]} (a Llama-style decoder is required)")
    sets = config.rope_parameter_sets()
    params = sets.get(None)
    if params is None or float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise MLAError(f"the deepseek_v3 format needs one full rotary embedding; this model has {config.rope_parameters}")
    inv_freq, scaling = MLARotaryEmbedding(config)._frequencies()[None]
    eligible = plain_frequencies([float(f) for f in inv_freq], float(scaling), params, config.head_dim)
    if not set(want) <= eligible:
        raise MLAError(f"the deepseek_v3 format needs plain RoPE frequencies theta^(-2i/d) (rope_type 'default'); the "
                       f"{params.get('rope_type', 'default')!r} RoPE of this model changes some of {want}")
    return rank, rope, deepseek_theta(float(params["rope_theta"]), stride, rope, config.head_dim)


def _interleave(rows: torch.Tensor, rope: int) -> torch.Tensor:
    """RoPE rows ``[re_0..re_{r/2-1} | im_0..im_{r/2-1}]`` (rotate-half) -> ``re_0, im_0, re_1, im_1, ...``."""
    half = rope // 2
    order = [k for j in range(half) for k in (j, j + half)]
    return rows[order]


def _deinterleave(rows: torch.Tensor, rope: int) -> torch.Tensor:
    """The inverse of ``_interleave``."""
    half = rope // 2
    order = [2 * j for j in range(half)] + [2 * j + 1 for j in range(half)]
    return rows[order]


def _map_rope_rows(name: str, t: torch.Tensor, rank: int, rope: int, heads: int, nope: int, fn) -> torch.Tensor:
    """Apply ``fn`` (``_interleave`` / ``_deinterleave``) to the RoPE rows of a q_proj / kv_a_proj_with_mqa weight."""
    if name.endswith("self_attn.q_proj.weight"):
        q = t.view(heads, nope + rope, -1)
        t = torch.cat((q[:, :nope], torch.stack([fn(q[h, nope:], rope) for h in range(heads)])), 1)
        return t.reshape(heads * (nope + rope), -1)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return torch.cat((t[:rank], fn(t[rank:], rope)))
    return t


def deepseek_v3_config(config):
    """The stock ``DeepseekV3Config`` of an ``MLAConfig`` the format can express (MLAError otherwise)."""
    from transformers import DeepseekV3Config

    rank, rope, theta = check_deepseek_v3(config)
    n, heads = config.num_hidden_layers, config.num_attention_heads
    ds = DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size, num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=heads, n_shared_experts=1, n_routed_experts=1,
        num_experts_per_tok=1, n_group=0, topk_group=0,  # no expert groups: llama.cpp asserts n_group < experts
        first_k_dense_replace=n, moe_layer_freq=1,
        num_mtp_layers=0, kv_lora_rank=rank, q_lora_rank=None, qk_rope_head_dim=rope,
        qk_nope_head_dim=config.qk_nope_head_dim, v_head_dim=config.v_head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": theta},
        rope_interleave=True, attention_bias=False, attention_dropout=config.attention_dropout,
        tie_word_embeddings=False, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    ds.architectures = ["DeepseekV3ForCausalLM"]
    ds.rope_theta = theta  # also the legacy key: stacks that read only rope_theta would fall back to 10000
    ds.dtype = getattr(config, "dtype", None)
    return ds


def deepseek_v3_tensors(config, state: dict[str, torch.Tensor]):
    """``(DeepseekV3Config, tensors)`` of the MLA model ``config`` (an ``MLAConfig``) with weights ``state``."""
    ds = deepseek_v3_config(config)
    args = (ds.kv_lora_rank, ds.qk_rope_head_dim, ds.num_attention_heads, ds.qk_nope_head_dim, _interleave)
    out = {name: _map_rope_rows(name, t, *args).contiguous() for name, t in state.items()}
    if "lm_head.weight" not in out:  # vLLM never ties: the head is written out
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return ds, out


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("model.safetensors") or
                  p.name.startswith("model-") and p.name.endswith(".safetensors"))


def write_deepseek_v3(folder: Path, config) -> dict:
    """Rewrite the MLA export in ``folder`` (weights + ``config``, an ``MLAConfig`` meeting the format's constraints)
    as a stock ``deepseek_v3`` checkpoint in place: permuted RoPE rows, an explicit ``lm_head``, DeepSeek's
    ``config.json``, no remote code and no ``auto_map``; tensor names and shapes are checked against the stock model.
    Returns what the record keeps (theta', stride)."""
    folder = Path(folder)
    ds = deepseek_v3_config(config)
    args = (ds.kv_lora_rank, ds.qk_rope_head_dim, ds.num_attention_heads, ds.qk_nope_head_dim, _interleave)
    reader = SafetensorsReader(folder)
    names = sorted(reader.names())
    staging = folder / ".deepseek_v3"
    staging.mkdir()
    writer = ShardWriter(staging)
    for name in names:
        writer.add(name, _map_rope_rows(name, reader.get([name])[name], *args))
    if "lm_head.weight" not in names:  # vLLM never ties: the head is written out
        writer.add("lm_head.weight", reader.get(["model.embed_tokens.weight"])["model.embed_tokens.weight"])
    writer.close()  # shards (and their index, when more than one)
    for old in _weight_files(folder):
        old.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, folder / path.name)
    staging.rmdir()
    for name in REMOTE_CODE_FILES:
        (folder / name).unlink(missing_ok=True)
    ds.save_pretrained(folder)
    check_stock(folder)
    return {"rope_theta": ds.rope_parameters["rope_theta"], "rope_stride": rope_stride(config),
            "kv_lora_rank": ds.kv_lora_rank, "qk_rope_head_dim": ds.qk_rope_head_dim}


def check_stock(folder: Path) -> None:
    """The tensor names and shapes in ``folder`` are exactly those of a stock ``DeepseekV3ForCausalLM`` built from
    its ``config.json`` (on the meta device: no memory), and the config has no ``auto_map``."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    raw = json.loads((Path(folder) / "config.json").read_text())
    if "auto_map" in raw or raw.get("model_type") != "deepseek_v3":
        raise MLAError(f"internal error: {folder}/config.json is not a stock deepseek_v3 config")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_pretrained(folder))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v[2]) for k, v in SafetensorsReader(folder).entries.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise MLAError(f"internal error: the deepseek_v3 tensors do not match the stock model ({diff[0]})")


def is_deepseek_v3(folder) -> bool:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == "deepseek_v3"
    except (OSError, json.JSONDecodeError):
        return False


def dense_problems(ds) -> list[str]:
    """What a ``DeepseekV3Config`` has that the dense exports of ``mla convert --format deepseek_v3`` never have."""
    params = dict(ds.rope_parameters or {})
    problems = {
        "query compression (q_lora_rank)": ds.q_lora_rank is not None,
        "mixture-of-experts layers": ds.first_k_dense_replace < ds.num_hidden_layers,
        "biases": bool(ds.attention_bias),
        "a rope_type other than default": params.get("rope_type", "default") != "default",
        "qk_nope_head_dim != v_head_dim": ds.qk_nope_head_dim != ds.v_head_dim,
        "RoPE in rotate-half pairs (rope_interleave false)": not getattr(ds, "rope_interleave", True),
        f"the activation {ds.hidden_act!r}": ds.hidden_act != "silu",
    }
    return [what for what, present in problems.items() if present]


def mla_config_from_deepseek(ds):
    """Our ``MLAConfig`` of a stock DeepSeek-V3 checkpoint written by ``write_deepseek_v3`` (dense, no query
    compression, no biases): frequencies ``theta'^(-2j/r)`` are the first ``r/2`` of a ``d_h``-wide table with
    ``theta = theta'^(d_h/r)``."""
    n = ds.num_hidden_layers
    params = dict(ds.rope_parameters or {})
    bad = dense_problems(ds)
    if bad:
        raise MLAError(f"this deepseek_v3 checkpoint has {bad[0]}: only the dense exports of mla convert --format "
                       "deepseek_v3 can be read back")
    rope, d_h = ds.qk_rope_head_dim, ds.qk_nope_head_dim
    theta = float(params["rope_theta"]) ** (d_h / rope)
    return MLAConfig(
        vocab_size=ds.vocab_size, hidden_size=ds.hidden_size, intermediate_size=ds.intermediate_size,
        num_hidden_layers=n, num_attention_heads=ds.num_attention_heads, num_key_value_heads=ds.num_attention_heads,
        head_dim=d_h, kv_lora_rank=ds.kv_lora_rank, qk_rope_head_dim=rope, qk_nope_head_dim=d_h,
        v_head_dim=ds.v_head_dim, rope_freq_indices=[list(range(rope // 2))] * n, kv_a_layernorm=True,
        hidden_act=ds.hidden_act, max_position_embeddings=ds.max_position_embeddings,
        initializer_range=ds.initializer_range, rms_norm_eps=ds.rms_norm_eps, pad_token_id=ds.pad_token_id,
        bos_token_id=ds.bos_token_id, eos_token_id=ds.eos_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, attention_dropout=ds.attention_dropout,
    )


def load_mla(folder, dtype=torch.float32):
    """Our ``MLAForCausalLM`` from an export in either format (a deepseek_v3 one with its RoPE rows de-interleaved:
    the same model); MLAError naming the first missing or unexpected weight."""
    from transformers import DeepseekV3Config

    folder = Path(folder)
    if not is_deepseek_v3(folder):
        model, info = MLAForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
        if missing:
            raise MLAError(f"weights of {folder} are incomplete: {len(missing)} missing, e.g. {sorted(missing)[0]}")
        return model
    config = mla_config_from_deepseek(DeepseekV3Config.from_pretrained(folder))
    reader = SafetensorsReader(folder)
    args = (config.kv_lora_rank, config.qk_rope_head_dim, config.num_attention_heads, config.qk_nope_head_dim,
            _deinterleave)
    state = {name: _map_rope_rows(name, t, *args) for name, t in reader.get(sorted(reader.names())).items()}
    with torch.device("meta"):
        model = MLAForCausalLM(config)
    want = set(model.state_dict())
    if set(state) != want:
        diff = sorted(set(state) ^ want)[0]
        raise MLAError(f"weights of {folder} do not match a dense deepseek_v3 export: {diff}")
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = MLARotaryEmbedding(config)  # its frequency buffers were built on meta
    return model.to(dtype).eval()
