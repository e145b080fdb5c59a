"""The ``mla`` command line. ``mla <command> --help`` documents every option."""

import argparse
import os
import sys
import typing
from dataclasses import MISSING, fields

from .config import ConvertConfig, load_recipe
from .errors import MLAError


def _arg_type(tp):
    """bool/int/float/str out of a field annotation such as ``float | None``."""
    options = typing.get_args(tp) or (tp,)
    return next((t for t in (bool, int, float, str) if t in options), str)


def _add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field; the field's help text becomes ``--help``."""
    for f in fields(cls):
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


def cmd_convert(args) -> int:
    from .pipeline import convert

    recipe = load_recipe(args.recipe) if args.recipe else {}
    cfg = _config_from_args(args, ConvertConfig, recipe)
    convert(args.src, args.out, cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--recipe", help="YAML recipe whose 'convert:' keys set the options below (flags override it)")
    _add_config_args(p, ConvertConfig)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MLAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (nothing was written)", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
