"""The ``mla convert`` and ``mla finetune`` commands: their arguments and how they call the pipeline and the recovery.

``convert.cli`` (the door) lists them in its command table.
"""

import argparse
from pathlib import Path

from .config import (ConvertConfig, add_config_args, config_from_args, has_section, keys_epilog, load_recipe,
                     parse_overrides)
from .errors import MLAError
from .pipeline import convert
from .recover import convert_and_recover, finetune
from .recover.config import RecoverConfig

SOURCE_HELP = "model folder, Hugging Face Hub id, .gguf file, or smollm2-135m"


def _recipe_inputs(recipe: str | None) -> list[Path]:
    """The recipe file, which no output may replace."""
    return [Path(recipe).expanduser().resolve()] if recipe else []


def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Convert a Hugging Face model into an MLA export: SRC (a model folder, Hub id, .gguf file, or "
                     "smollm2-135m) into OUT, in our format or as a stock deepseek_v3 checkpoint (--format).")
    p.add_argument("src", metavar="SRC", help=SOURCE_HELP)
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument("--recipe", help="YAML recipe whose 'convert:' keys set the options below (flags override it); "
                   "with a 'recover:' section, the conversion is followed by recovery fine-tuning (see mla finetune)")
    p.add_argument("--restart", action="store_true",
                   help="with a recovery recipe: discard checkpoints in OUT.ckpt instead of resuming from them")
    add_config_args(p, ConvertConfig)


def convert_command(args) -> int:
    recipe = load_recipe(args.recipe) if args.recipe else {}
    cfg = config_from_args(args, ConvertConfig, recipe)
    inputs = _recipe_inputs(args.recipe)
    if args.recipe and has_section(args.recipe, "recover"):
        rcfg = RecoverConfig(**load_recipe(args.recipe, "recover", RecoverConfig))
        convert_and_recover(args.src, args.out, cfg, rcfg, restart=args.restart, inputs=inputs, recipe=args.recipe)
        return 0
    if args.restart:
        raise MLAError("--restart only applies to a recipe with a 'recover:' section")
    convert(args.src, args.out, cfg, inputs=inputs)
    return 0


def finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Recover a conversion's quality by distillation from the original model: fine-tune the MLA export "
                     "CONVERTED (its attention and norms as full parameters, the MLP with LoRA via peft or, with "
                     "lora_targets=, as full parameters too) and write merged weights (+ the peft adapter, if any) to "
                     "OUT. Checkpoints go to OUT.ckpt; re-running the same command resumes. Several processes: "
                     "accelerate launch -m convert.cli finetune ... or torchrun -m convert.cli finetune ...")
    p.epilog = keys_epilog(RecoverConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("converted", metavar="CONVERTED", help="an export written by mla convert")
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="override recipe keys, e.g. lr=5e-4 tokens=100000")
    p.add_argument("--recipe", help="YAML recipe whose 'recover:' keys set the options (overrides win)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    p.add_argument("--restart", action="store_true", help="discard checkpoints in OUT.ckpt instead of resuming")


def finetune_command(args) -> int:
    values = load_recipe(args.recipe, "recover", RecoverConfig) if args.recipe else {}
    values.update(parse_overrides(args.overrides, RecoverConfig))
    finetune(args.converted, args.out, RecoverConfig(**values), overwrite=args.overwrite, restart=args.restart,
             inputs=_recipe_inputs(args.recipe), recipe=args.recipe)
    return 0
