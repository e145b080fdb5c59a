"""What an export says about itself: its config (``MLAConfig``), the tensors written layer by layer, its generation
config and the conversion record ``mla_conversion.json``."""

import json
import platform
from pathlib import Path

import torch

from mla_modeling.configuration_mla import MLAConfig

from . import __version__
from .adapters import EMBED, FINAL_NORM, HEAD, Layout, attention_prefix, is_attention
from .allocate import is_lossless, requested_budget
from .assemble import LayerPlan
from .layerwise import LayerwiseModel
from .device import peak_memory
from .files import write_error
from .save import AUTO_MAP, ShardWriter, copy_remote_code, write_json


def build_config(src_config, layout: Layout, plans: list[LayerPlan], freq_index: list[list[int]], dtype: torch.dtype,
                 latent_norm: bool = False):
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


def absolute_spec(source) -> str:
    """The source as a spec that works from any folder (what mla finetune loads as the teacher)."""
    if source.gguf_file:
        return str(Path(source.path) / source.gguf_file)
    local = Path(source.spec).expanduser()
    return str(local.resolve()) if local.is_dir() else source.spec


class ExportSink:
    """Writes each converted layer (its new attention plus its other tensors, in the export dtype) into shards; a
    fused gate|up projection (Phi-3) is written as ``gate_proj`` and ``up_proj``."""

    def __init__(self, folder: Path, lw: LayerwiseModel, dtype: torch.dtype, layout: Layout):
        self.folder, self.writer, self.lw, self.dtype, self.layout = folder, ShardWriter(folder), lw, dtype, layout

    def __call__(self, i: int, tensors: dict, freq_index) -> None:
        for name, t in tensors.items():
            self.writer.add(attention_prefix(i) + name, t.to(self.dtype))
        rest = [n for n in self.lw.layer_names(i) if not is_attention(n)]
        for name, t in self.lw.reader.get(rest).items():
            for new_name, part in self.layout.export_tensors(name, t):
                self.writer.add(new_name, part.to(self.dtype))

    def globals(self) -> None:
        names = [EMBED, FINAL_NORM]
        if not self.lw.config.tie_word_embeddings:
            names.append(HEAD)
        for name in names:
            self.writer.add(name, self.lw.reader.get([name])[name].to(self.dtype))

    def close(self) -> None:
        """The embedding, final norm and head, then the last shard and the index."""
        self.globals()
        try:
            self.writer.close()
        except OSError as err:
            raise write_error(err, self.folder) from None


def folder_bytes(path) -> int | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and ".work" not in f.parts)


def save_generation_config(source, folder: Path) -> None:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(source.path, **source.load_kwargs())
    except Exception:  # noqa: BLE001 - no generation config (or none readable): the export simply has none
        return
    # the latent cache is a DynamicCache: a source's own cache choice (Gemma 3's "hybrid") would not fit it
    gen.cache_implementation = None
    gen.save_pretrained(folder)


def conversion_record(src, source, cfg, layout: Layout, plans, freq_index, dtype, calib, config) -> dict:
    mla_values = config.cache_values_per_token()
    orig_values = layout.kv_values_per_token_layer * layout.num_layers
    esize = torch.empty((), dtype=dtype).element_size()
    return {
        "format_version": 1,
        "format": cfg.format,
        "tool": f"mla-retrofit {__version__}",
        "source": {
            "spec": src,
            "resolved": absolute_spec(source),
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
            "requested_kv_budget": requested_budget(cfg),
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


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained``, naming the class ``PreTrainedTokenizerFast`` where transformers 5 writes its new
    ``TokenizersBackend`` (the same tokenizer.json-backed class in 5.x): older transformers, and llama.cpp's converter
    under its pinned 4.x, then read the export's tokenizer too."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def write_export_files(folder: Path, config, tokenizer, source):
    """Beside the weights: the config, the remote code, the tokenizer and the source's generation config."""
    try:
        config.save_pretrained(folder)
        copy_remote_code(folder)
        save_tokenizer(tokenizer, folder)
        save_generation_config(source, folder)
    except OSError as err:
        raise write_error(err, folder) from None
    return config


def write_record(folder: Path, record: dict, deepseek: dict | None, *, source, device, compute_dtype,
                 clock, layer_seconds: dict) -> dict:
    """``mla_conversion.json``: ``record`` (``conversion_record`` with its ``verify``), the deepseek_v3 rewrite (if
    any), the run's time and profile (``layer_seconds``: the per-layer maths' seconds by step)."""
    if deepseek is not None:
        record["deepseek_v3"] = deepseek
    record["elapsed_s"] = clock.elapsed()
    record["profile"] = {
        "device": str(device), "compute_dtype": str(compute_dtype).replace("torch.", ""),
        **peak_memory(device), "stage_s": clock.stages,
        "layer_maths_s": {k: round(v, 2) for k, v in layer_seconds.items()},
        "layer_maths_s_per_layer": round(sum(layer_seconds.values()) / record["source"]["num_layers"], 3),
        "source_bytes": folder_bytes(source.local), "export_bytes": folder_bytes(folder),
    }
    write_json(folder / "mla_conversion.json", record)
    return record
