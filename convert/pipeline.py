"""The conversion pipeline: load -> calibrate -> RoPE split -> factorize -> assemble -> save -> verify.

Memory: the source model plus one layer's work. Each layer's new tensors are computed in float64 from the source
projections, cast to the export dtype, and the source's k/v projections are dropped as we go.
"""

import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import Layout, read_layout
from .allocate import allocate, budget_totals, uniform_plans
from .assemble import LayerPlan, convert_layer
from .calibrate import collect_statistics
from .config import ConvertConfig
from .data import load_texts, token_windows
from .errors import MLAError
from .save import (AUTO_MAP, atomic_dir, check_out, copy_remote_code, local_inputs, out_lock, save_state_dict,
                   write_json)
from .sources import input_paths, load_config, load_model, resolve_source
from .weights import check_weights

DEFAULT_BUDGET = 0.3125
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _requested_budget(cfg: ConvertConfig) -> float | None:
    """The budget asked for: --kv-budget, else the default unless explicit ranks were given."""
    if cfg.kv_budget is not None:
        return cfg.kv_budget
    return None if cfg.kv_lora_rank is not None or cfg.rope_dim is not None else DEFAULT_BUDGET


def check_plan(layout: Layout, cfg: ConvertConfig) -> list[LayerPlan] | None:
    """Validate the requested ranks before any work: the final uniform plans, or None when they need calibration."""
    kv_dim = layout.num_kv_heads * layout.head_dim
    if cfg.kv_lora_rank is not None or cfg.rope_dim is not None:
        if cfg.kv_lora_rank is None or cfg.rope_dim is None:
            raise MLAError("give both --kv-lora-rank and --rope-dim (or --kv-budget)")
        return uniform_plans(layout, cfg.kv_lora_rank, cfg.rope_dim)
    budget = _requested_budget(cfg)
    if round(budget * 2 * kv_dim) >= 2 * kv_dim:
        return uniform_plans(layout, kv_dim, kv_dim)  # all of RoPE kept, the latent is V: lossless
    total, d_rope = budget_totals(layout, cfg, budget)
    return uniform_plans(layout, total - d_rope, d_rope) if cfg.rank_alloc == "uniform" else None


def is_lossless(layout: Layout, plans: list[LayerPlan] | None) -> bool:
    kv_dim = layout.num_kv_heads * layout.head_dim
    return plans is not None and all(p.d_rope == kv_dim and p.rank == kv_dim for p in plans)


def needs_gradients(layout: Layout, cfg: ConvertConfig, plans: list[LayerPlan] | None) -> bool:
    if is_lossless(layout, plans):
        return False
    return plans is None or cfg.rope_method == "rotate" or cfg.factor_method == "fisher"


def make_plans(model, stats, layout: Layout, cfg: ConvertConfig) -> list[LayerPlan]:
    plans = check_plan(layout, cfg)
    if plans is not None:
        return plans
    total, d_rope = budget_totals(layout, cfg, _requested_budget(cfg))
    attns = [layer.self_attn for layer in model.model.layers]
    return allocate(attns, stats, layout, total, d_rope, cfg.rope_method, cfg.rope_span)


def convert_weights(model, stats, layout: Layout, plans: list[LayerPlan], cfg: ConvertConfig, dtype: torch.dtype,
                    free: bool = False) -> tuple[dict, list[list[int]]]:
    """The export's state dict and per-layer RoPE frequencies; ``free`` drops the source projections as it goes."""
    lossless = is_lossless(layout, plans)
    rope_method, factor_method = ("high", "pca") if lossless else (cfg.rope_method, cfg.factor_method)
    rope_scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0) or 1.0)
    state, freq_index = {}, []
    for i, layer in enumerate(tqdm(model.model.layers, desc="convert layers", unit="layer")):
        attn = layer.self_attn
        tensors, freqs = convert_layer(attn, stats[i], layout, plans[i], rope_method, factor_method, cfg.rope_span,
                                       rope_scaling)
        for name, t in tensors.items():
            state[f"model.layers.{i}.self_attn.{name}"] = t.to(dtype)
        freq_index.append(freqs)
        if free:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(attn, name, None)
            stats[i] = None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if ".self_attn." in name or (tied and name == "lm_head.weight"):
            continue
        state[name] = t.detach().to(dtype)
    return state, freq_index


def build_config(src_config, layout: Layout, plans: list[LayerPlan], freq_index: list[list[int]], dtype: torch.dtype):
    from mla_modeling.configuration_mla import MLAConfig

    ranks = [p.rank for p in plans]
    ropes = [p.d_rope for p in plans]
    config = MLAConfig(
        vocab_size=src_config.vocab_size,
        hidden_size=layout.hidden_size,
        intermediate_size=src_config.intermediate_size,
        num_hidden_layers=layout.num_layers,
        num_attention_heads=layout.num_heads,
        num_key_value_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        kv_lora_rank=ranks[0] if len(set(ranks)) == 1 else ranks,
        qk_rope_head_dim=ropes[0] if len(set(ropes)) == 1 else ropes,
        qk_nope_head_dim=layout.head_dim,
        v_head_dim=layout.head_dim,
        rope_freq_indices=freq_index,
        hidden_act=src_config.hidden_act,
        max_position_embeddings=src_config.max_position_embeddings,
        initializer_range=getattr(src_config, "initializer_range", 0.02),
        rms_norm_eps=src_config.rms_norm_eps,
        pad_token_id=src_config.pad_token_id,
        bos_token_id=src_config.bos_token_id,
        eos_token_id=src_config.eos_token_id,
        tie_word_embeddings=bool(getattr(src_config, "tie_word_embeddings", False)),
        rope_parameters=dict(layout.rope_parameters),
        attention_bias=layout.qkv_bias,
        o_proj_bias=layout.o_bias,
        attention_dropout=float(getattr(src_config, "attention_dropout", 0.0) or 0.0),
        mlp_bias=layout.mlp_bias,
        sliding_window=layout.sliding_window,
        layer_types=layout.layer_types,
    )
    config.architectures = ["MLAForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    return config


def _export_dtype(cfg: ConvertConfig, src_config) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    dtype = getattr(src_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in DTYPES.values() else torch.float32


@torch.no_grad()
def _logits(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(input_ids=windows[i : i + batch_size], use_cache=False).logits.float()
                      for i in range(0, len(windows), batch_size)])


def _compare(ref: torch.Tensor, new: torch.Tensor) -> dict:
    logp, logq = ref.log_softmax(-1), new.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return {
        "max_abs_logit_diff": float((ref - new).abs().max()),
        "mean_kl": float(kl),
        "top1_agreement": float((ref.argmax(-1) == new.argmax(-1)).float().mean()),
        "tokens": int(ref.shape[0] * ref.shape[1]),
    }


def calibration_windows(tokenizer, texts, cfg: ConvertConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, verification)`` token windows; verification windows are at most 256 tokens."""
    windows = token_windows(tokenizer, texts, cfg.calib_len, cfg.calib_seqs + cfg.verify_seqs, seed=cfg.seed)
    n_verify = min(cfg.verify_seqs, max(len(windows) - 1, 0))
    calib, verify = windows[: len(windows) - n_verify], windows[len(windows) - n_verify :]
    if n_verify == 0:
        verify = windows[:1]
    return calib, verify[:, : min(256, verify.shape[1])]


def _absolute_spec(source) -> str:
    """The source as a spec that works from any folder (what mla finetune loads as the teacher)."""
    if source.gguf_file:
        return str(Path(source.path) / source.gguf_file)
    local = Path(source.spec).expanduser()
    return str(local.resolve()) if local.is_dir() else source.spec


def convert(src: str, out: str | Path, cfg: ConvertConfig, log=print, inputs=()) -> dict:
    """Convert ``src`` into an MLA export at ``out``; return the conversion record.

    ``inputs``: more local paths the command reads (a recipe) that OUT must not replace.
    """
    cfg.validate()
    out = check_out(out, cfg.overwrite, [*input_paths(src), *local_inputs(cfg.calib), *inputs])
    with out_lock(out):
        return _convert(src, out, cfg, log)


def _convert(src: str, out: Path, cfg: ConvertConfig, log) -> dict:
    from mla_modeling.modeling_mla import MLAForCausalLM

    started = time.time()
    source = resolve_source(src)
    src_config = load_config(source)
    layout = read_layout(src_config)
    plans = check_plan(layout, cfg)
    check_weights(source, src_config)  # before the text download and the model allocation
    texts = load_texts(cfg.calib)
    dtype = _export_dtype(cfg, src_config)
    torch.manual_seed(cfg.seed)

    log(f"loading {source.description} ({layout.model_type}, {layout.kind}: {layout.num_heads} query / "
        f"{layout.num_kv_heads} KV heads, head_dim {layout.head_dim}, {layout.num_layers} layers)")
    model, tokenizer = load_model(source, config=src_config)
    calib, verify = calibration_windows(tokenizer, texts, cfg)
    ref_logits = _logits(model, verify, cfg.batch_size)
    stats = collect_statistics(model, calib, cfg.batch_size, gradients=needs_gradients(layout, cfg, plans))
    plans = plans or make_plans(model, stats, layout, cfg)
    state, freq_index = convert_weights(model, stats, layout, plans, cfg, dtype, free=True)

    config = build_config(src_config, layout, plans, freq_index, dtype)
    mla_values = config.cache_values_per_token()
    orig_values = layout.kv_values_per_token_layer * layout.num_layers
    esize = torch.empty((), dtype=dtype).element_size()
    record = {
        "format_version": 1,
        "tool": f"mla-retrofit {__version__}",
        "source": {
            "spec": src,
            "resolved": _absolute_spec(source),
            "description": source.description,
            "model_type": layout.model_type,
            "attention": layout.kind,
            "num_layers": layout.num_layers,
            "num_attention_heads": layout.num_heads,
            "num_key_value_heads": layout.num_kv_heads,
            "head_dim": layout.head_dim,
        },
        "method": {
            "rope": cfg.rope_method,
            "rope_span": cfg.rope_span,
            "factorization": cfg.factor_method,
            "rank_alloc": cfg.rank_alloc,
            "rope_share": cfg.rope_share,
            "lossless": is_lossless(layout, plans),
            "dtype": str(dtype).replace("torch.", ""),
        },
        "budget": {
            "requested_kv_budget": _requested_budget(cfg),
            "achieved_kv_budget": mla_values / orig_values,
        },
        "ranks": {
            "kv_lora_rank": [p.rank for p in plans],
            "qk_rope_head_dim": [p.d_rope for p in plans],
            "rope_freq_indices": freq_index,
        },
        "kv_cache": {
            "original_values_per_token": orig_values,
            "mla_values_per_token": mla_values,
            "dtype_bytes": esize,
            "original_bytes_per_token": orig_values * esize,
            "mla_bytes_per_token": mla_values * esize,
            "ratio": mla_values / orig_values,
        },
        "calibration": {
            "data": cfg.calib,
            "sequences": int(calib.shape[0]),
            "seq_len": int(calib.shape[1]),
            "tokens": int(calib.numel()),
            "seed": cfg.seed,
        },
        "versions": {
            "mla-retrofit": __version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
    }

    with atomic_dir(out, cfg.overwrite) as tmp:
        save_state_dict(state, tmp)
        config.save_pretrained(tmp)
        copy_remote_code(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        del model, state
        exported = MLAForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        record["verify"] = _compare(ref_logits, _logits(exported, verify, cfg.batch_size))
        record["elapsed_s"] = round(time.time() - started, 1)
        write_json(tmp / "mla_conversion.json", record)
    kv = record["kv_cache"]
    log(f"converted {src} -> {out}: KV cache {kv['original_bytes_per_token']} -> {kv['mla_bytes_per_token']} "
        f"bytes/token ({kv['ratio']:.2%}, {1 - kv['ratio']:.1%} saved); verify top-1 agreement "
        f"{record['verify']['top1_agreement']:.1%}, max |dlogit| {record['verify']['max_abs_logit_diff']:.2e}; "
        f"{record['elapsed_s']:.0f}s")
    return record
