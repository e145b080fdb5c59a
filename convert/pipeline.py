"""The conversion pipeline: load -> calibrate -> RoPE split -> factorize -> assemble -> save -> verify.

Layer-sequential: the source is read one decoder layer at a time (``layerwise``); calibration pushes every token
through one layer at a time and keeps only the layer-boundary hidden states; a reverse sweep gives the gradients;
each layer is converted as soon as its statistics (or, with per-layer rank allocation, every layer's small summary)
are complete, and the export is written shard by shard. Memory: one layer, the embedding or one output-head chunk,
the boundary states (on disk beyond ``SPILL_BYTES``) and one layer's statistics. Sources that are not a local
safetensors folder (GGUF, ``.bin``, Hub ids) are loaded whole by transformers, then converted the same way.
With ``--format deepseek_v3`` the layers are converted under that format's constraints (``deepseek``), verified
as our MLA model, then the folder is rewritten as a stock DeepSeek-V3 checkpoint.
"""

import os
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import Layout, read_layout, text_config
from .allocate import MIN_RANK, LayerConverter, Strided, budget_totals, lossless_plans, uniform_plans
from .assemble import LayerPlan
from .calibrate import sweep
from .config import ConvertConfig
from .data import load_sources, mixed_windows, read_budget, source_paths
from .device import DTYPES, compute_dtype, peak_memory, resolve_device, source_dtype
from .deepseek import check_layout, write_deepseek_v3
from .errors import MLAError
from .files import write_error
from .layerwise import LayerwiseModel, Spill
from .readers import SafetensorsReader, open_reader
from .save import ShardWriter
from .files import atomic_dir, check_out, out_lock
from .save import AUTO_MAP, copy_remote_code, write_json
from .sources import check_positions, input_paths, load_config, load_tokenizer, resolve_source
from .weights import check_weights

DEFAULT_BUDGET = 0.3125
VLLM_MLA_WIDTHS = (320, 512, 576)  # vLLM 0.33 MLA head sizes (docs/deepseek-v3-serving-research.md)
NORM_SAMPLES = 4096  # calibration tokens per layer on which the deepseek_v3 format's latent norm is fitted
SPILL_BYTES = int(os.environ.get("MLA_SPILL_BYTES", 2**30))  # in-memory boundary states / statistics before disk


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
        return lossless_plans(layout)  # all of RoPE kept, the latent is V (and any never-rotated key dims)
    total, d_rope = budget_totals(layout, cfg, budget)
    return uniform_plans(layout, total - d_rope, d_rope) if cfg.rank_alloc == "uniform" else None


def strided_plan(layout: Layout, cfg: ConvertConfig, eligible: set[int]) -> Strided:
    """The deepseek_v3 format's plan: cached values per layer and the RoPE widths to choose from (explicit ranks:
    exactly those; with rotate + fisher, every multiple of 8 up to ``head_dim``, chosen by estimated loss; otherwise
    ``rope_share`` of the budget)."""
    if cfg.kv_lora_rank is not None:  # check_plan validated them
        if not 2 <= cfg.rope_dim <= layout.rotary_dim:
            raise MLAError(f"--format deepseek_v3 needs --rope-dim between 2 and head_dim {layout.rotary_dim}")
        return Strided(cfg.kv_lora_rank + cfg.rope_dim, [cfg.rope_dim], eligible)
    budget = _requested_budget(cfg)
    total = round(budget * 2 * layout.kv_dim)
    if total < 3:
        raise MLAError(f"--kv-budget {budget} leaves no room for a latent and a RoPE key ({total} values per token "
                       "per layer)")
    top = min(layout.rotary_dim, total - MIN_RANK)
    ropes = list(range(8, top + 1, 8)) if cfg.rope_method == "rotate" and cfg.factor_method == "fisher" else []
    if not ropes:
        share = 2 * round(cfg.rope_share * total / 2)
        ropes = [max(2, min(share, layout.rotary_dim, 2 * ((total - 1) // 2)))]
    return Strided(total, ropes, eligible)


def is_lossless(layout: Layout, plans: list[LayerPlan] | None) -> bool:
    return plans is not None and plans == lossless_plans(layout)


def needs_gradients(layout: Layout, cfg: ConvertConfig, plans: list[LayerPlan] | None) -> bool:
    if is_lossless(layout, plans):
        return False
    return plans is None or cfg.rope_method == "rotate" or cfg.factor_method == "fisher"


def needs_statistics(layout: Layout, cfg: ConvertConfig, plans: list[LayerPlan] | None) -> bool:
    return not is_lossless(layout, plans)


def layer_converter(layout: Layout, cfg: ConvertConfig, plans, reader, sink, store, strided: Strided | None = None):
    """The LayerConverter for ``cfg`` (plans None: fisher allocation under the budget's totals, or the deepseek_v3
    format's ``strided`` plan)."""
    if strided is not None:
        return LayerConverter(layout, cfg, None, reader, sink, store, strided=strided)
    totals = None if plans is not None else budget_totals(layout, cfg, _requested_budget(cfg))
    return LayerConverter(layout, cfg, plans, reader, sink, store, totals, is_lossless(layout, plans))


def build_config(src_config, layout: Layout, plans: list[LayerPlan], freq_index: list[list[int]], dtype: torch.dtype,
                 latent_norm: bool = False):
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
        qk_norm=layout.qk_norm,
        kv_a_layernorm=latent_norm,
        **layout.decoder,
    )
    config.architectures = ["MLAForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    return config


def export_io(config) -> dict:
    """The embedding / logit transforms of an export's config, for ``LayerwiseModel``."""
    return {k: getattr(config, k) for k in ("embedding_multiplier", "logits_scaling", "final_logit_softcapping")}


def _export_dtype(cfg: ConvertConfig, src_config) -> torch.dtype:
    return DTYPES[cfg.dtype] if cfg.dtype != "auto" else source_dtype(src_config)


def _compare(ref: LayerwiseModel, new: LayerwiseModel, ref_h: torch.Tensor, new_h: torch.Tensor,
             block: int = 64) -> dict:
    """Logit agreement of two models' final hidden states (B, T, d), ``block`` positions at a time (the logits of
    a 256K vocabulary are 1 MiB per position in float32)."""
    max_diff, kl, agree, tokens = 0.0, 0.0, 0, 0
    spans = [(b, t) for b in range(ref_h.shape[0]) for t in range(0, ref_h.shape[1], block)]
    for b, t in spans:
        p = ref.logits(ref_h[b : b + 1, t : t + block])  # (1, block, V)
        q = new.logits(new_h[b : b + 1, t : t + block])
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
        max_diff = max(max_diff, float((p - q).abs().max()))
        kl += float((logp.exp() * (logp - logq)).sum(-1).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += p.shape[1]
    return {"max_abs_logit_diff": max_diff, "mean_kl": kl / tokens, "top1_agreement": agree / tokens,
            "tokens": tokens}


def run_layers(lw: LayerwiseModel, windows: torch.Tensor, desc: str) -> torch.Tensor:
    """Final hidden states of ``windows`` through every layer of ``lw``, one layer at a time."""
    with torch.no_grad():
        h = lw.embed(windows)
        for i in tqdm(range(lw.num_layers), desc=desc, unit="layer"):
            lw.load(i)
            h = lw.run(i, h)
            lw.release(i)
    return h


def calibration_windows(tokenizer, sources, cfg: ConvertConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, verification)`` token windows of ``sources`` (``load_sources``: one document list per source of
    the mix); verification windows are at most 256 tokens."""
    windows = mixed_windows(tokenizer, sources, cfg.calib_len, cfg.calib_seqs + cfg.verify_seqs, seed=cfg.seed)
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
    out = check_out(out, cfg.overwrite, [*input_paths(src), *source_paths(cfg.calib), *inputs])
    with out_lock(out):
        return _convert(src, out, cfg, log)


def export_tensors(name: str, t: torch.Tensor, layout: Layout) -> list[tuple[str, torch.Tensor]]:
    """A source tensor outside the attention under its export name(s): a fused gate|up projection (Phi-3, gate rows
    first) becomes ``gate_proj`` and ``up_proj``; every other tensor is kept as it is."""
    fused = f".mlp.{layout.fused_mlp}." if layout.fused_mlp else None
    if fused and fused in name:
        gate, up = t.chunk(2, dim=0)  # (I, d) each
        return [(name.replace(fused, ".mlp.gate_proj."), gate), (name.replace(fused, ".mlp.up_proj."), up)]
    return [(name, t)]


class _ExportSink:
    """Writes each converted layer (its new attention plus its other tensors, in the export dtype) into shards; a
    fused gate|up projection (Phi-3) is written as ``gate_proj`` and ``up_proj``."""

    def __init__(self, writer: ShardWriter, lw: LayerwiseModel, dtype: torch.dtype, layout: Layout):
        self.writer, self.lw, self.dtype, self.layout = writer, lw, dtype, layout

    def __call__(self, i: int, tensors: dict, freq_index) -> None:
        for name, t in tensors.items():
            self.writer.add(f"model.layers.{i}.self_attn.{name}", t.to(self.dtype))
        rest = [n for n in self.lw.layer_names(i) if ".self_attn." not in n]
        for name, t in self.lw.reader.get(rest).items():
            for new_name, part in export_tensors(name, t, self.layout):
                self.writer.add(new_name, part.to(self.dtype))

    def globals(self) -> None:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.lw.config.tie_word_embeddings:
            names.append("lm_head.weight")
        for name in names:
            self.writer.add(name, self.lw.reader.get([name])[name].to(self.dtype))


def _convert(src: str, out: Path, cfg: ConvertConfig, log) -> dict:
    from mla_modeling.configuration_mla import MLAConfig  # noqa: F401  (registered for the export's skeleton)

    started = time.time()
    stages: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.time()
        stages[name] = round(stages.get(name, 0.0) + now - t0, 2)
        return now

    device = resolve_device(cfg.device)
    source = resolve_source(src)
    full_config = load_config(source)
    layout = read_layout(full_config)
    src_config = text_config(full_config)  # the model that is converted (a multimodal checkpoint's text model)
    deepseek = cfg.format == "deepseek_v3"
    plans = check_plan(layout, cfg)  # validates the ranks / budget in every format
    strided = strided_plan(layout, cfg, check_layout(layout, cfg)) if deepseek else None
    plans = None if deepseek else plans
    check_weights(source, full_config)  # before the text download and any allocation
    check_positions(full_config, cfg.calib_len, "--calib-len", src)
    texts = load_sources(cfg.calib, read_budget((cfg.calib_seqs + cfg.verify_seqs) * cfg.calib_len))
    dtype, work_dtype = _export_dtype(cfg, full_config), compute_dtype(device, full_config)
    torch.manual_seed(cfg.seed)

    log(f"loading {source.description} ({layout.model_type}, {layout.kind}: {layout.num_heads} query / "
        f"{layout.num_kv_heads} KV heads, head_dim {layout.head_dim}, {layout.num_layers} layers) on {device}")
    if layout.text_of:
        log(f"{layout.text_of} checkpoint: converting its text model ({layout.model_type}); the vision tower and "
            "projector are not part of the export")
    tokenizer = load_tokenizer(source)
    calib, verify = calibration_windows(tokenizer, texts, cfg)
    if int(max(calib.max(), verify.max())) >= src_config.vocab_size:
        raise MLAError(f"the tokenizer of {src} gives token ids up to {int(max(calib.max(), verify.max()))}, beyond "
                       f"the model's vocabulary ({src_config.vocab_size})")
    lw = LayerwiseModel(src_config, open_reader(source, src_config, log), device, work_dtype, layout.layer_types,
                        layout.decoder)
    t0 = lap("load", started)

    with atomic_dir(out, cfg.overwrite) as tmp:
        store = Spill(tmp / ".work", SPILL_BYTES)
        writer = ShardWriter(tmp)
        sink = _ExportSink(writer, lw, dtype, layout)
        converter = layer_converter(layout, cfg, plans, lw.reader, sink, store, strided)
        if needs_statistics(layout, cfg, plans):
            ref_h = sweep(lw, layout, calib, cfg.batch_size, needs_gradients(layout, cfg, plans), converter.add, store,
                          extra=verify, samples=NORM_SAMPLES if deepseek else 0)
        else:
            ref_h = run_layers(lw, verify, "reference")
            for i in range(layout.num_layers):
                converter.add(i, None)
        t0 = lap("calibrate", t0)
        plans, freq_index = converter.finish()
        sink.globals()
        try:
            writer.close()
        except OSError as err:
            raise write_error(err, tmp) from None
        t0 = lap("convert", t0)

        config = build_config(src_config, layout, plans, freq_index, dtype, latent_norm=deepseek)
        try:
            config.save_pretrained(tmp)
            copy_remote_code(tmp)
            tokenizer.save_pretrained(tmp)
            _save_generation_config(source, tmp)
        except OSError as err:
            raise write_error(err, tmp) from None
        exported = LayerwiseModel(config, SafetensorsReader(tmp), device, work_dtype, config.layer_types,
                                  export_io(config))
        verify_result = _compare(lw, exported, ref_h, run_layers(exported, verify, "verify"))
        t0 = lap("verify", t0)
        record = _record(src, source, cfg, layout, plans, freq_index, dtype, calib, config)
        record["verify"] = verify_result
        if deepseek:  # the verified MLA model, rewritten as the stock format (the same model)
            fits = [converter.norm_fits[i] for i in range(layout.num_layers)]
            record["deepseek_v3"] = {**write_deepseek_v3(tmp, config), "rope_search": converter.search,
                                     "latent_norm": {"samples_per_layer": fits[0]["samples"],
                                                     **{k: [f[k] for f in fits] for k in
                                                        ("error", "error_plain", "condition")}}}
            t0 = lap("write deepseek_v3", t0)
            width = record["deepseek_v3"]["kv_lora_rank"] + record["deepseek_v3"]["qk_rope_head_dim"]
            if width not in VLLM_MLA_WIDTHS:
                log(f"note: vLLM's MLA attention takes kv_lora_rank + qk_rope_head_dim of {VLLM_MLA_WIDTHS} only; "
                    f"this export's {width} runs there with VLLM_MLA_DISABLE=1 (no latent cache) or in SGLang "
                    "(--attention-backend triton); see README")
        record["elapsed_s"] = round(time.time() - started, 1)
        record["profile"] = {
            "device": str(device), "compute_dtype": str(work_dtype).replace("torch.", ""), **peak_memory(device),
            "stage_s": stages,
            "layer_maths_s": {k: round(v, 2) for k, v in converter.seconds.items()},
            "layer_maths_s_per_layer": round(sum(converter.seconds.values()) / layout.num_layers, 3),
            "source_bytes": _folder_bytes(source.local), "export_bytes": _folder_bytes(tmp),
        }
        store.close()
        write_json(tmp / "mla_conversion.json", record)
    kv = record["kv_cache"]
    prof = record["profile"]
    fmt = " (stock deepseek_v3)" if cfg.format == "deepseek_v3" else ""
    log(f"converted {src} -> {out}{fmt}: KV cache {kv['original_bytes_per_token']} -> {kv['mla_bytes_per_token']} "
        f"bytes/token ({kv['ratio']:.2%}, {1 - kv['ratio']:.1%} saved); verify top-1 agreement "
        f"{record['verify']['top1_agreement']:.1%}, max |dlogit| {record['verify']['max_abs_logit_diff']:.2e}; "
        f"{record['elapsed_s']:.0f}s, peak RSS {prof['peak_rss_bytes'] / 2**30:.2f} GiB")
    return record


def _folder_bytes(path) -> int | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and ".work" not in f.parts)


def _save_generation_config(source, folder: Path) -> None:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(source.path, **source.load_kwargs())
    except Exception:  # noqa: BLE001 - no generation config (or none readable): the export simply has none
        return
    # the latent cache is a DynamicCache: a source's own cache choice (Gemma 3's "hybrid") would not fit it
    gen.cache_implementation = None
    gen.save_pretrained(folder)


def _record(src, source, cfg: ConvertConfig, layout: Layout, plans, freq_index, dtype, calib, config) -> dict:
    mla_values = config.cache_values_per_token()
    orig_values = layout.kv_values_per_token_layer * layout.num_layers
    esize = torch.empty((), dtype=dtype).element_size()
    return {
        "format_version": 1,
        "format": cfg.format,
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
            "rank_alloc": "uniform" if cfg.format == "deepseek_v3" else cfg.rank_alloc,
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
