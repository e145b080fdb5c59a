"""The ``mla`` command line. ``mla <command> --help`` documents every option."""

import argparse
import os
import shlex
import sys
import typing
from pathlib import Path
from dataclasses import MISSING, fields

from .config import ConvertConfig, has_section, load_recipe, parse_overrides
from .errors import MLAError, Parser, run_command
from .recover.config import RecoverConfig
from .sources import quiet_library_warnings


def _arg_type(tp):
    """bool/int/float/str out of a field annotation such as ``float | None``."""
    options = typing.get_args(tp) or (tp,)
    return next((t for t in (bool, int, float, str) if t in options), str)


def _add_config_args(parser: argparse.ArgumentParser, cls, only=None) -> None:
    """One ``--flag`` per dataclass field (or per field named in ``only``); the field's help text becomes ``--help``."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        helptext = f.metadata.get("help", "")
        kind = _arg_type(f.type)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=helptext)
            continue
        parser.add_argument(flag, dest=f.name, type=kind, default=None,
                            help=f"{helptext} (default: {default})")


def _config_from_args(args, cls, recipe_values: dict):
    """Dataclass defaults, then the recipe, then the flags given on the command line."""
    flags = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**recipe_values, **flags})


def _recipe_inputs(recipe: str | None) -> list[Path]:
    """The recipe file, which no output may replace."""
    return [Path(recipe).expanduser().resolve()] if recipe else []


def cmd_convert(args) -> int:
    from .pipeline import convert

    recipe = load_recipe(args.recipe) if args.recipe else {}
    cfg = _config_from_args(args, ConvertConfig, recipe)
    inputs = _recipe_inputs(args.recipe)
    if args.recipe and has_section(args.recipe, "recover"):
        from .recover import convert_and_recover

        rcfg = RecoverConfig(**load_recipe(args.recipe, "recover"))
        convert_and_recover(args.src, args.out, cfg, rcfg, restart=args.restart, inputs=inputs)
        return 0
    if args.restart:
        raise MLAError("--restart only applies to a recipe with a 'recover:' section")
    convert(args.src, args.out, cfg, inputs=inputs)
    return 0


def cmd_finetune(args) -> int:
    from .recover import finetune

    values = load_recipe(args.recipe, "recover") if args.recipe else {}
    values.update(parse_overrides(args.overrides, RecoverConfig))
    finetune(args.converted, args.out, RecoverConfig(**values), overwrite=args.overwrite, restart=args.restart,
             inputs=_recipe_inputs(args.recipe))
    return 0


def _keys_epilog(cls) -> str:
    lines = ["recipe keys (recover: section) and key=value overrides:"]
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        lines.append(f"  {f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    from .sweep import parse_list, sweep

    base = _config_from_args(args, ConvertConfig, {})
    sweep(args.src, args.out, parse_list(args.budgets, float, "budgets"), parse_list(args.methods, str, "methods"), base,
          text=args.text, tokens=args.tokens, seq_len=args.seq_len, overwrite=bool(args.overwrite), plot=not args.no_plot)
    return 0


def cmd_eval(args) -> int:
    from eval.evaluate import EvalConfig, evaluate

    cfg = _config_from_args(args, EvalConfig, {})
    if not args.models:
        raise MLAError("give at least one MODEL to evaluate")
    command = "mla eval " + " ".join(shlex.quote(a) for a in (args.argv or []))
    results = evaluate(args.models, args.baseline, args.out, cfg, overwrite=args.overwrite, command=command)
    print(_eval_summary(results, args.out))
    return 0


def _eval_summary(results: dict, out) -> str:
    """One line: where the report is, and each converted model's perplexity ratio and KV share."""
    rows = results["models"]
    base = rows[0] if results["baseline"] else None
    parts = []
    for r in rows[1:] if base else rows:
        bits = [r["name"]]
        if base and r.get("ppl") and base.get("ppl"):
            bits.append(f"ppl {r['ppl'] / base['ppl']:.3f}x")
        if base:
            bits.append(f"KV {r['kv_bytes_per_token'] / base['kv_bytes_per_token']:.1%}")
        parts.append(" ".join(bits))
    return f"evaluated {len(rows)} model(s) in {results['seconds']:.0f} s: {'; '.join(parts)} -> {out}/report.md"


def cmd_bench(args) -> int:
    from eval.bench import BenchConfig, bench, summary

    cfg = _config_from_args(args, BenchConfig, {})
    result = bench(args.models, args.baseline, cfg, json_path=args.json)
    print(summary(result))
    return 0


def cmd_bench_convert(args) -> int:
    from eval.bench_convert import bench_convert

    bench_convert(args.shape, args.convert_args or None, out=args.out, tokenizer=args.tokenizer, load_check=args.load_check,
                  json_path=args.json, overwrite=args.overwrite)
    return 0


def _add_models_args(p: argparse.ArgumentParser) -> None:
    """MODEL [MODEL ...] and --baseline, shared by mla eval and mla bench."""
    p.add_argument("models", metavar="MODEL", nargs="+", help="converted model folder(s), Hub id(s) or smollm2-135m")
    p.add_argument("--baseline", help="the original model, measured first and compared against")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mla",
        description="Retrofit Multi-head Latent Attention (DeepSeek-V2/V3) into pretrained MHA/GQA/MQA LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint into an MLA model folder (loads with trust_remote_code=True)",
        description="Convert SRC (a model folder, Hub id, .gguf file, or smollm2-135m) into an MLA export at OUT.",
    )
    p.add_argument("src", metavar="SRC", help="model folder, Hugging Face Hub id, .gguf file, or smollm2-135m")
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument("--recipe", help="YAML recipe whose 'convert:' keys set the options below (flags override it); "
                   "with a 'recover:' section, the conversion is followed by recovery fine-tuning (see mla finetune)")
    p.add_argument("--restart", action="store_true",
                   help="with a recovery recipe: discard checkpoints in OUT.ckpt instead of resuming from them")
    _add_config_args(p, ConvertConfig)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "finetune",
        help="recover a converted model's quality: LoRA + distillation from the original, merged export",
        description="Fine-tune the MLA export CONVERTED by distillation from the model it was converted from (LoRA via "
        "peft) and write merged weights + the peft adapter to OUT. Checkpoints go to OUT.ckpt; re-running the same "
        "command resumes. Multi-GPU: accelerate launch -m convert.cli finetune ...",
        epilog=_keys_epilog(RecoverConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("converted", metavar="CONVERTED", help="an export written by mla convert")
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="override recipe keys, e.g. lr=5e-4 tokens=100000")
    p.add_argument("--recipe", help="YAML recipe whose 'recover:' keys set the options (overrides win)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    p.add_argument("--restart", action="store_true", help="discard checkpoints in OUT.ckpt instead of resuming")
    p.set_defaults(func=cmd_finetune)

    from .data import EVALUATION_DEFAULT
    from .sweep import DEFAULT_BUDGETS, DEFAULT_METHODS, PRESETS

    methods = "; ".join(f"{name}: {text}" for name, (_, text) in PRESETS.items())
    p = sub.add_parser(
        "sweep",
        help="perplexity ratio vs KV budget for several methods (table + PNG plot)",
        description="Convert SRC in memory at each budget with each method and measure held-out perplexity against "
        "the original in the same run. Writes sweep.json/.csv/.md/.png into --out.",
    )
    p.add_argument("src", metavar="SRC", help="model folder, Hugging Face Hub id, .gguf file, or smollm2-135m")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated KV budgets (default: {DEFAULT_BUDGETS})")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated presets (default: {DEFAULT_METHODS}). {methods}")
    p.add_argument("--text", default=EVALUATION_DEFAULT, help=f"held-out evaluation text (default: {EVALUATION_DEFAULT})")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (default: 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window length (default: 512)")
    p.add_argument("--out", help="output folder (default: sweeps/<source name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    _add_config_args(p, ConvertConfig, only={"calib", "calib_seqs", "calib_len", "seed", "batch_size", "device"})
    p.set_defaults(func=cmd_sweep)

    from eval.evaluate import EvalConfig

    p = sub.add_parser(
        "eval",
        help="lm-eval tasks, perplexity, KV cache and decode speed: converted models beside the original",
        description="Evaluate MODEL(s) (and --baseline, the original) one after another in one run: lm-eval tasks "
        "(local offline ones from eval/tasks or any lm-eval task), held-out perplexity, the KV cache per token "
        "(measured) and a short decode-speed probe. Writes report.md, results.json and report.png into --out.",
    )
    _add_models_args(p)
    p.add_argument("--out", required=True, help="report folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    _add_config_args(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    from eval.bench import BenchConfig

    p = sub.add_parser(
        "bench",
        help="decode and prefill speed, KV cache and peak memory: converted models beside the original",
        description="Benchmark MODEL(s) (and --baseline) one at a time, each (batch, context) pair in its own "
        "process: prefill a random batch x context prompt, then time new-tokens greedy decode steps (median of --runs) "
        "and count the kernels of one more step. Prints a table per pair with ratios to the original and, with --json, "
        "saves it. --compile: static cache and torch.compile; --capacity: the largest batch that fits. A benchmark: "
        "compare models only within one run.",
    )
    _add_models_args(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_config_args(p, BenchConfig)
    p.set_defaults(func=cmd_bench)

    from eval.bench_convert import DEFAULT_ARGS, SHAPES

    p = sub.add_parser(
        "bench-convert",
        help="peak memory and time of converting a random-weight bf16 checkpoint of a real shape",
        usage="mla bench-convert SHAPE [--out OUT] [--overwrite] [--tokenizer T] [--load-check] [--json F] [-- CONVERT-OPTIONS]",
        description="Write (once, into the user cache) a random-weight bf16 checkpoint of SHAPE, run mla convert on "
        "it in a child process and report its peak RSS, wall time and stage times. Arguments after -- go to mla "
        f"convert (default: {' '.join(DEFAULT_ARGS)}).",
    )
    p.add_argument("shape", choices=list(SHAPES), help="the real model whose tensor shapes are used")
    p.add_argument("--out", help="where the export goes (default: the user cache, replaced each run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--tokenizer", default="smollm2-135m", help="model whose tokenizer the checkpoint gets")
    p.add_argument("--load-check", action="store_true",
                   help="then load the export in bf16 with AutoModelForCausalLM and check finite logits")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench_convert)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_warnings()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if argv[:1] == ["bench-convert"] and "--" in argv:  # mla bench-convert SHAPE [options] -- <mla convert options>
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    # key=value overrides may come before or after --recipe/--overwrite; argparse only takes them in one run
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = args.overrides + extra
    args.argv = argv[1:]
    args.convert_args = passthrough
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
