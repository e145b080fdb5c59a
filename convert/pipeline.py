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
from pathlib import Path

import torch

from .adapters import text_config
from .allocate import convert_layers, plan
from .card import command_line, source_hub_id, source_license, write_card
from .config import ConvertConfig, fit_to_model
from .data import calibration_data, source_paths
from .deepseek import write_deepseek_v3
from .device import StageClock, compute_dtype, export_dtype, resolve_device
from .export import ExportSink, build_config, conversion_record, write_export_files, write_record
from .files import atomic_dir, check_out, out_lock
from .layerwise import LayerwiseModel, Spill
from .readers import open_reader
from .sources import check_positions, input_paths, load_tokenizer, open_source
from .verify import verify_export

VLLM_MLA_WIDTHS = (320, 512, 576)  # vLLM 0.33 MLA head sizes (docs/deepseek-v3-serving-research.md)
NORM_SAMPLES = 4096  # calibration tokens per layer on which the deepseek_v3 format's latent norm is fitted
SPILL_BYTES = int(os.environ.get("MLA_SPILL_BYTES", 2**30))  # in-memory boundary states / statistics before disk


def convert(src: str, out: str | Path, cfg: ConvertConfig, log=print, inputs=()) -> dict:
    """Convert ``src`` into an MLA export at ``out``; return the conversion record.

    ``inputs``: more local paths the command reads (a recipe) that OUT must not replace.
    """
    cfg.validate()
    out = check_out(out, cfg.overwrite, [*input_paths(src), *source_paths(cfg.calib), *inputs])
    with out_lock(out):
        return _convert(src, out, cfg, log)


def _convert(src: str, out: Path, cfg: ConvertConfig, log) -> dict:
    """The stages in order; each call below goes to the file that owns that stage."""
    clock = StageClock()
    command = command_line(["mla", "convert", src, "OUT"], cfg)  # for the model card, as given (before fitting)
    device = resolve_device(cfg.device)
    source, full_config, layout = open_source(src, {})  # sources, adapters, weights
    cfg = fit_to_model(cfg, full_config)  # config: a default length fits the model's positions
    check_positions(full_config, cfg.calib_len, "--calib-len", src)
    tokenizer = load_tokenizer(source)
    src_config = text_config(full_config)  # adapters: the model converted (a multimodal checkpoint's text model)
    _announce(source, layout, device, log)
    plans, strided = plan(layout, cfg)  # allocate: validates the ranks / budget before any work
    deepseek = cfg.format == "deepseek_v3"
    dtype, work_dtype = export_dtype(cfg.dtype, full_config), compute_dtype(device, full_config)
    torch.manual_seed(cfg.seed)
    calib, verify = calibration_data(tokenizer, cfg, src_config.vocab_size, src)  # data
    lw = LayerwiseModel(src_config, open_reader(source, src_config, log), device, work_dtype, layout.layer_types,
                        layout.decoder)  # readers, layerwise
    clock.lap("load")

    with atomic_dir(out, cfg.overwrite) as tmp:
        store = Spill(tmp / ".work", SPILL_BYTES)  # layerwise: boundary states and statistics beyond memory
        sink = ExportSink(tmp, lw, dtype, layout)  # export: the tensors, shard by shard, as layers are converted
        plans, freq_index, ref_h, converter = convert_layers(lw, layout, cfg, plans, strided, calib, verify, sink,
                                                             store, clock, NORM_SAMPLES if deepseek else 0)
        config = build_config(src_config, layout, plans, freq_index, dtype, latent_norm=deepseek)
        write_export_files(tmp, config, tokenizer, source)
        verify_result = verify_export(lw, tmp, config, ref_h, verify)  # verify
        clock.lap("verify")
        written = None
        if deepseek:  # the verified MLA model, rewritten as the stock format (the same model)
            written = _write_deepseek(tmp, config, converter, layout, log)
            clock.lap("write deepseek_v3")
        record = conversion_record(src, source, cfg, layout, plans, freq_index, dtype, calib, config)
        record["command"] = command
        record["source"].update(hub_id=source_hub_id(source), license=source_license(source, full_config))
        record["verify"] = verify_result  # what the card reports and the record keeps
        write_card(tmp, record)  # README.md, inside the temporary folder (before the record, whose sizes count it)
        write_record(tmp, record, written, source=source, device=device, compute_dtype=work_dtype,
                     clock=clock, layer_seconds=converter.seconds)
    kv = record["kv_cache"]
    prof = record["profile"]
    fmt = " (stock deepseek_v3)" if cfg.format == "deepseek_v3" else ""
    log(f"converted {src} -> {out}{fmt}: KV cache {kv['original_bytes_per_token']} -> {kv['mla_bytes_per_token']} "
        f"bytes/token ({kv['ratio']:.2%}, {1 - kv['ratio']:.1%} saved); verify top-1 agreement "
        f"{record['verify']['top1_agreement']:.1%}, max |dlogit| {record['verify']['max_abs_logit_diff']:.2e}; "
        f"{record['elapsed_s']:.0f}s, peak RSS {prof['peak_rss_bytes'] / 2**30:.2f} GiB")
    return record


def _announce(source, layout, device, log) -> None:
    log(f"loading {source.description} ({layout.model_type}, {layout.kind}: {layout.num_heads} query / "
        f"{layout.num_kv_heads} KV heads, head_dim {layout.head_dim}, {layout.num_layers} layers) on {device}")
    if layout.text_of:
        log(f"{layout.text_of} checkpoint: converting its text model ({layout.model_type}); the vision tower and "
            "projector are not part of the export")


def _write_deepseek(folder: Path, config, converter, layout, log) -> dict:
    """The export rewritten as a stock DeepSeek-V3 checkpoint; its record (RoPE search, latent-norm fits)."""
    fits = [converter.norm_fits[i] for i in range(layout.num_layers)]
    written = {**write_deepseek_v3(folder, config), "rope_search": converter.search,
               "latent_norm": {"samples_per_layer": fits[0]["samples"],
                               **{k: [f[k] for f in fits] for k in ("error", "error_plain", "condition")}}}
    width = written["kv_lora_rank"] + written["qk_rope_head_dim"]
    if width not in VLLM_MLA_WIDTHS:
        log(f"note: vLLM's MLA attention takes kv_lora_rank + qk_rope_head_dim of {VLLM_MLA_WIDTHS} only; "
            f"this export's {width} runs there with VLLM_MLA_DISABLE=1 (no latent cache) or in SGLang "
            "(--attention-backend triton); see docs/serving.md")
    return written
