"""The ``mla`` command line: the one door. ``mla <command> --help`` documents every option.

One table names every command, the module that owns it and the prefix of its two functions there:
``<prefix>_arguments(parser)`` adds its arguments and ``<prefix>_command(args) -> int`` runs it. Only the module of
the command that runs is imported (``importlib``), so ``mla --help`` loads no torch and a command never pays for
another's imports. Every command runs inside ``convert.errors.run_command``: each way it can end is one ``error:``
line and an exit status.
"""

import importlib
import os
import sys
from dataclasses import dataclass

from .errors import MLAError, Parser, run_command


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # defines <prefix>_arguments(parser) and <prefix>_command(args)
    prefix: str
    processes: bool = False  # runs as several processes of one launch (torchrun, accelerate launch)

    def functions(self):
        module = importlib.import_module(self.module)
        return getattr(module, f"{self.prefix}_arguments"), getattr(module, f"{self.prefix}_command")


COMMANDS = {
    "convert": Command("convert a Hugging Face model into an MLA export (our format, or a stock deepseek_v3 checkpoint)",
                       "convert.commands", "convert"),
    "finetune": Command("recover a conversion's quality by distillation from the original model; writes a merged export",
                        "convert.commands", "finetune", processes=True),
    "sweep": Command("perplexity ratio against KV budget for several methods (table + PNG plot)", "eval.sweep",
                     "sweep"),
    "eval": Command("lm-eval tasks, perplexity, KV cache and a decode probe: converted models beside the original",
                    "eval.evaluate", "eval"),
    "perplexity": Command("held-out perplexity of a model and its original on the same token windows",
                          "eval.perplexity", "perplexity"),
    "bench": Command("decode and prefill speed, KV cache and peak memory: converted models beside the original",
                     "eval.bench", "bench"),
    "gguf": Command("write a deepseek_v3 export as a llama.cpp GGUF that caches only the latent",
                    "convert.gguf_export", "gguf"),
    "bench-convert": Command("peak memory and time of converting a random-weight bf16 checkpoint of a real shape",
                             "eval.bench_convert", "bench_convert"),
}


def build_parser(name: str | None = None) -> Parser:
    """The ``mla`` parser; only the arguments of command ``name`` are added (and its module imported)."""
    parser = Parser(
        prog="mla",
        description="Retrofit Multi-head Latent Attention (DeepSeek-V2/V3) into pretrained MHA/GQA/MQA LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command_name, command in COMMANDS.items():
        p = sub.add_parser(command_name, help=command.help, description=command.help)
        if command_name == name:
            add_arguments, run = command.functions()
            add_arguments(p)
            p.set_defaults(func=run)
    return parser


def launch_processes() -> int:
    """How many processes the launch that started this one has (torchrun and accelerate launch set ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``): 1 for a plain run."""
    counts = {"WORLD_SIZE": 0, "LOCAL_WORLD_SIZE": 0, "RANK": 1, "LOCAL_RANK": 1}  # a rank r means r + 1 processes
    found = 1
    for name, extra in counts.items():
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            found = max(found, int(value) + extra)
    return found


def check_launch(name: str) -> None:
    """MLAError when command ``name`` runs in one process but was started as one of several."""
    processes = launch_processes()
    if processes > 1 and not COMMANDS[name].processes:
        several = ", ".join(f"mla {n}" for n, c in COMMANDS.items() if c.processes)
        raise MLAError(f"mla {name} runs in one process, but it was started as one of {processes} (torchrun, "
                       f"accelerate launch): run it without a launcher (only {several} runs on several processes)")


def _run(args) -> int:
    check_launch(args.command)
    return args.func(args)


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``mla bench-convert SHAPE [options] -- <mla convert options>``: the part after ``--`` goes to mla convert."""
    if argv[:1] == ["bench-convert"] and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def parse(argv: list[str]):
    """An ``mla`` command line parsed as ``main`` parses it, running nothing: the arguments (``args.func`` runs the
    command, ``args.overrides`` holds mla finetune's key=value items, ``args.convert_args`` what follows ``--`` for
    mla bench-convert). A usage error exits with status 2 and one ``error:`` line (``SystemExit``)."""
    argv, passthrough = _split_passthrough(list(argv))
    name = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(name)
    # key=value overrides may come before or after --recipe/--overwrite; argparse only takes them in one run
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = args.overrides + extra
    args.argv = argv[1:]
    args.convert_args = passthrough
    return args


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(sys.argv[1:] if argv is None else argv)
    from .sources import quiet_library_warnings  # after the parse: transformers loads only for a command that runs

    quiet_library_warnings()
    return run_command(_run, args)


if __name__ == "__main__":
    sys.exit(main())
