"""Estimate the memory of one ``mla finetune`` process for a real model shape, without its weights (issue 26).

    python tools/recover_memory.py llama-3.1-8b --budget 0.25 --recipe recipes/gpu-1b-8b.yaml [key=value ...]

The student is built on the meta device from the shape (``eval.bench_convert.SHAPES``) with uniform ranks at the KV
budget (a conversion's per-layer ranks differ, their sum is the budget's), wrapped by peft as ``mla finetune`` wraps
it, its frozen weights cast to ``frozen_dtype``; ``convert.recover.memory.estimate`` then gives the terms. The
teacher's own bytes are its whole attention (an upper bound). Prints the layer-local stage's estimate
(``estimate_local``, when ``local_tokens``; the whole student on each process, sharded or not), then the
distillation's: one line each, its terms and total.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.config import load_recipe, parse_overrides  # noqa: E402
from convert.recover.config import RecoverConfig  # noqa: E402
from convert.recover.local import stage_estimate, step_windows  # noqa: E402
from convert.recover.memory import describe, estimate  # noqa: E402
from convert.recover.models import cast_frozen, cast_untrained, wrap_peft  # noqa: E402
from eval.bench_convert import SHAPES  # noqa: E402
from mla_modeling.configuration_mla import MLAConfig  # noqa: E402
from mla_modeling.modeling_mla import MLAForCausalLM  # noqa: E402

ROPE = 64  # the shared RoPE key's width per layer (a conversion's varies by layer)


def student_config(shape: dict, budget: float) -> MLAConfig:
    """An MLA config of the shape's dimensions whose cache per token and layer is ``budget`` of the original's."""
    head_dim, kv, layers = shape["head_dim"], shape["num_key_value_heads"], shape["num_hidden_layers"]
    width = round(budget * 2 * kv * head_dim)  # latent + RoPE key
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings", "rms_norm_eps")
    return MLAConfig(**{k: shape[k] for k in keys}, kv_lora_rank=[width - ROPE] * layers,
                     qk_rope_head_dim=[ROPE] * layers, qk_nope_head_dim=head_dim, v_head_dim=head_dim,
                     rope_parameters=shape["rope_parameters"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--recipe", help="recipe whose recover: section gives the settings")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 precision (CUDA's auto)")
    p.add_argument("--processes", type=int, default=1, help="processes a shard=true run splits the state over")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    values = load_recipe(args.recipe, "recover", RecoverConfig) if args.recipe else {}
    values.update(parse_overrides(args.overrides, RecoverConfig))
    cfg = RecoverConfig(**values)
    shape = dict(SHAPES[args.shape])
    teacher = AutoConfig.for_model(shape.pop("model_type"), **shape)
    frozen = torch.bfloat16 if cfg.frozen_dtype == "bfloat16" or (cfg.frozen_dtype == "auto" and args.bf16) else torch.float32
    with torch.device("meta"):
        student = MLAForCausalLM(student_config(dict(SHAPES[args.shape]), args.budget))
    cast_frozen(student, cfg, frozen)
    if cfg.local_tokens:  # the stage before distillation, on the student as loaded (no adapters yet)
        windows = math.ceil(cfg.local_tokens / cfg.seq_len)
        print(f"layer-local stage, {windows} windows of {cfg.seq_len}, {step_windows(cfg, windows)} per step: "
              f"{describe(stage_estimate(student, teacher, windows, cfg))}")
    model = wrap_peft(student, cfg)
    cast_untrained(model, frozen)
    micro = min(cfg.micro_batch or cfg.batch_size, cfg.batch_size)
    shards = args.processes if cfg.shard else 1
    micro = min(micro, cfg.batch_size // args.processes)  # each process takes its share of a batch
    terms = estimate(model, teacher, cfg.seq_len, micro, cfg.gradient_checkpointing, frozen, args.bf16,
                     shards=shards)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.shape} at {args.budget}, {cfg.batch_size} x {cfg.seq_len} tokens per step in micro-batches of "
          f"{micro}, gradient checkpointing {cfg.gradient_checkpointing}, frozen {str(frozen)[6:]}, "
          f"{args.processes} process(es){' sharded' if shards > 1 else ''}, "
          f"{trained / 1e6:.0f}M trained parameters: {describe(terms)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
