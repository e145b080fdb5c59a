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
import time
from pathlib import Path

import torch

from .adapters import read_layout, text_config
from .allocate import check_plan, layer_converter, needs_gradients, needs_statistics, strided_plan
from .calibrate import sweep
from .config import ConvertConfig
from .data import calibration_windows, load_sources, read_budget, source_paths
from .deepseek import check_layout, write_deepseek_v3
from .device import compute_dtype, export_dtype, peak_memory, resolve_device
from .errors import MLAError
from .export import ExportSink, build_config, conversion_record, export_io, folder_bytes, save_generation_config
from .files import atomic_dir, check_out, out_lock, write_error
from .layerwise import LayerwiseModel, Spill
from .readers import SafetensorsReader, open_reader
from .save import ShardWriter, copy_remote_code, write_json
from .sources import check_positions, input_paths, load_config, load_tokenizer, resolve_source
from .verify import compare, run_layers
from .weights import check_weights

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
    dtype, work_dtype = export_dtype(cfg.dtype, full_config), compute_dtype(device, full_config)
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
        sink = ExportSink(writer, lw, dtype, layout)
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
            save_generation_config(source, tmp)
        except OSError as err:
            raise write_error(err, tmp) from None
        exported = LayerwiseModel(config, SafetensorsReader(tmp), device, work_dtype, config.layer_types,
                                  export_io(config))
        verify_result = compare(lw, exported, ref_h, run_layers(exported, verify, "verify"))
        t0 = lap("verify", t0)
        record = conversion_record(src, source, cfg, layout, plans, freq_index, dtype, calib, config)
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
            "source_bytes": folder_bytes(source.local), "export_bytes": folder_bytes(tmp),
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


