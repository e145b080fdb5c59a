"""``mla gguf EXPORT OUT.gguf``: a ``deepseek_v3`` export as a llama.cpp ``deepseek2`` GGUF with its latent cache.

llama.cpp's ``deepseek2`` architecture runs MLA absorbed: it caches only ``[ckv ; kpe]`` (``kv_lora_rank +
qk_rope_head_dim`` values per token and layer, one KV head) and multiplies the queries by ``attn_k_b`` and the
attention output by ``attn_v_b``, the two halves of ``kv_b_proj`` per head. What it needs beyond the tensors:
- ``attention.q_lora_rank`` 0 (no query compression; the key is required unless the model has 26/27 layers);
- ``head_count_kv`` 1, ``key_length`` ``r + d_rope`` and ``value_length`` ``r`` (the cache's widths),
  ``key_length_mla`` / ``value_length_mla`` the decompressed head widths;
- every layer dense (``leading_dense_block_count`` = layers) and no expert count, so its MoE checks never run;
- RoPE in interleaved pairs (``rope_type`` NORM): the export's RoPE rows are interleaved already;
- the head tied again to the embeddings where the export's ``lm_head`` equals them (the HF format unties it).

Tensors stream one at a time from the safetensors shards into the file (no whole model in memory). Our own
``mla`` format cannot be written: llama.cpp normalises the latent and takes one width for all layers.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm
from transformers import DeepseekV3Config

from mla_modeling.configuration_mla import MLAConfig

from .deepseek import dense_problems
from .errors import MLAError
from .files import atomic_file, check_out_file, out_lock
from .gguf_vocab import add_tokenizer, read_json_object
from .readers import SafetensorsReader

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "deepseek2"


@dataclass(frozen=True)
class Shape:
    """What the GGUF needs to know of a dense deepseek_v3 export."""

    layers: int
    heads: int
    rank: int  # kv_lora_rank
    rope: int  # qk_rope_head_dim
    nope: int  # qk_nope_head_dim
    v: int  # v_head_dim


def _padding_cost(folder: Path) -> str:
    """What one width for all layers would cost an export of our own format, in cached values."""
    config = MLAConfig.from_pretrained(folder)
    n = config.num_hidden_layers
    ranks = [config.layer_kv_lora_rank(i) for i in range(n)]
    ropes = [config.layer_rope_dim(i) for i in range(n)]
    widths = [r + p for r, p in zip(ranks, ropes)]
    padded = (max(ranks) + max(ropes)) * n
    return (f"its layers cache {min(widths)}-{max(widths)} values per token; padded to one width "
            f"({max(ranks)} + {max(ropes)}) they would cache {padded / sum(widths) - 1:.0%} more, and it has no "
            "latent norm")


def read_export(folder: Path):
    """The export's ``DeepseekV3Config`` and ``Shape``; MLAError for anything llama.cpp's deepseek2 cannot run."""
    kind = read_json_object(folder / "config.json").get("model_type")
    if kind == MLAConfig.model_type:
        raise MLAError(f"llama.cpp runs one latent width with a latent norm; {folder} is in our mla format: "
                       f"{_padding_cost(folder)}. Convert with --format deepseek_v3")
    if kind != "deepseek_v3":
        raise MLAError(f"{folder} is not an mla convert export (model_type {kind!r}); mla gguf writes deepseek_v3 ones")
    try:
        ds = DeepseekV3Config.from_pretrained(folder)
        bad = dense_problems(ds)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise MLAError(f"{folder}/config.json is not a valid deepseek_v3 config: {err}") from None
    if bad:
        raise MLAError(f"{folder} has {bad[0]}: mla gguf writes the dense exports of mla convert --format deepseek_v3")
    shape = Shape(ds.num_hidden_layers, ds.num_attention_heads, ds.kv_lora_rank, ds.qk_rope_head_dim,
                  ds.qk_nope_head_dim, ds.v_head_dim)
    return ds, shape


def add_metadata(writer, ds, shape: Shape, name: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(ds.vocab_size)
    writer.add_context_length(ds.max_position_embeddings)
    writer.add_embedding_length(ds.hidden_size)
    writer.add_feed_forward_length(ds.intermediate_size)
    writer.add_block_count(shape.layers)
    writer.add_leading_dense_block_count(shape.layers)  # every layer dense: no MoE keys, no expert checks
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(1)  # absorbed MLA is MQA over the latent
    writer.add_layer_norm_rms_eps(ds.rms_norm_eps)
    writer.add_rope_freq_base(float(ds.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(shape.rope)
    writer.add_q_lora_rank(0)
    writer.add_kv_lora_rank(shape.rank)
    writer.add_key_length(shape.rank + shape.rope)
    writer.add_value_length(shape.rank)
    writer.add_key_length_mla(shape.nope + shape.rope)
    writer.add_value_length_mla(shape.v)
    writer.add_expert_feed_forward_length(ds.intermediate_size)  # read even for dense models
    writer.add_expert_shared_count(0)


# HF deepseek_v3 name (after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def split_kv_b(t: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj`` (heads * (nope + v), r) -> ``attn_k_b`` (heads, r, nope) and ``attn_v_b`` (heads, v, r): the
    query side multiplies by K_b^T, the output side by V_b (numpy order; ggml reads the shapes reversed)."""
    kv = t.view(shape.heads, shape.nope + shape.v, shape.rank)
    k_b, v_b = kv.split([shape.nope, shape.v], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def tensor_plan(reader: SafetensorsReader, shape: Shape, tied: bool) -> list[tuple[str, tuple, Callable]]:
    """``(gguf name, numpy shape, loader)`` for every tensor, in file order: shapes from the shard headers (no data
    read), and each loader reads only what it needs."""
    def one(gguf_name, name):
        return gguf_name, tuple(reader.entries[name][2]), lambda: reader.get([name])[name]

    def half(gguf_name, name, dims, k):
        return gguf_name, dims, lambda: split_kv_b(reader.get([name])[name], shape)[k]

    plan = [one("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(shape.layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        plan += [one(gg + dst, hf + src) for src, dst in LAYER_NAMES.items()]
        kv = hf + "self_attn.kv_b_proj.weight"
        plan.append(half(gg + "attn_k_b.weight", kv, (shape.heads, shape.rank, shape.nope), 0))
        plan.append(half(gg + "attn_v_b.weight", kv, (shape.heads, shape.v, shape.rank), 1))
    plan.append(one("output_norm.weight", "model.norm.weight"))
    if not tied:
        plan.append(one("output.weight", "lm_head.weight"))
    return plan


def is_tied(reader: SafetensorsReader) -> bool:
    """The export's head equals its embeddings (the deepseek_v3 format writes a tied source's head out)."""
    if "lm_head.weight" not in reader.names():
        return True
    got = reader.get(["lm_head.weight", "model.embed_tokens.weight"])
    return torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def ggml_type(name: str, shape: tuple[int, ...], outtype: str):
    """The GGUF type of a tensor: norms and vectors stay F32; Q8_0 needs rows in blocks of 32 (else F16)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return Q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if shape[-1] % block == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    data = t.detach().to(torch.float32).numpy()
    if qtype == Q.F32:
        return np.ascontiguousarray(data)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def nbytes(shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(folder, out, outtype: str = "f16", pre: str | None = None) -> dict:
    """Write the deepseek_v3 export ``folder`` as a llama.cpp GGUF at ``out`` (atomically); returns a summary."""
    folder = Path(folder).expanduser().resolve()
    ds, shape = read_export(folder)
    reader = SafetensorsReader(folder)
    tied = is_tied(reader)
    plan = tensor_plan(reader, shape, tied)
    types = {name: ggml_type(name, dims, outtype) for name, dims, _ in plan}
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(writer, ds, shape, folder.name)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
        tokenizer, tokenizer_note = add_tokenizer(writer, folder, ds.vocab_size, pre)
        for name, dims, _ in plan:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes(dims, types[name]), raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = 0
        for name, _, load in tqdm(plan, desc="gguf tensors", unit="tensor", leave=False):
            data = encode(load(), types[name])
            writer.write_tensor_data(data)
            total += data.nbytes
        writer.close()
    return {"tensors": len(plan), "bytes": total, "tied": tied, "tokenizer": tokenizer,
            "tokenizer_note": tokenizer_note,
            "kv_values_per_token_layer": shape.rank + shape.rope, "kv_lora_rank": shape.rank, "layers": shape.layers}


def gguf_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a deepseek_v3 export (mla convert --format deepseek_v3) as a llama.cpp GGUF (architecture "
                     "deepseek2): llama.cpp then caches only the latent and the shared RoPE key.")
    p.add_argument("export", metavar="EXPORT", help="a folder written by mla convert/finetune with --format deepseek_v3")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (atomically)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="weight type: f32, f16 (default), bf16 or q8_0 (norms stay f32; llama-quantize makes others)")
    p.add_argument("--tokenizer-pre", metavar="NAME", default=None,
                   help="llama.cpp's pre-tokenizer name, for a tokenizer.json mla gguf does not recognise")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")


def gguf_command(args) -> int:
    folder = Path(args.export).expanduser().resolve()
    if not folder.is_dir():
        raise MLAError(f"EXPORT {args.export} is not a folder")
    out = check_out_file(args.out, inputs=[folder], what="OUT.gguf")
    if out.exists() and not args.overwrite:
        raise MLAError(f"OUT.gguf {out} exists (use --overwrite to replace it)")
    with out_lock(out, what="OUT.gguf"):
        info = write_gguf(folder, out, args.outtype, args.tokenizer_pre)
    width, rank = info["kv_values_per_token_layer"], info["kv_lora_rank"]
    if info["tokenizer_note"]:
        print(f"note: {info['tokenizer_note']}")
    if width % 16 or rank % 16 == 0:
        print(f"note: cached width {width} (kv_lora_rank {rank}): llama.cpp's CPU kernels are fastest with a width that "
              "is a multiple of 16 and a kv_lora_rank that is not (AMX CPUs abort with flash attention otherwise); "
              "mla convert --format deepseek_v3 picks such widths from a --kv-budget (--width-block)")
    print(f"mla gguf: {out} ({info['bytes'] / 2**20:.1f} MiB of {args.outtype} tensors, {info['tensors']} tensors, "
          f"head {'tied' if info['tied'] else 'untied'}, {info['tokenizer']}); llama.cpp caches "
          f"{info['kv_values_per_token_layer']} values per token and layer")
    return 0
