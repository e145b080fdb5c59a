"""The user's documents: README.md and docs/ cannot drift from the CLI or point nowhere.

Every fenced ``mla ...`` command line in them parses with the CLI's own parser (``convert.cli.parse``, no work done;
``mla finetune``'s key=value items as the command reads them); every relative markdown link names a file that exists;
no ticket numbers and no work-log phrases; README.md stays short; ``mla --help``'s one-line descriptions are the
README's words.
"""

import re
import shlex

import pytest

from conftest import ROOT
from convert.cli import COMMANDS, parse
from convert.config import ConvertConfig, parse_overrides
from convert.recover.config import RecoverConfig

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_LINES = 350
TICKET = re.compile(r"\b(issue|ticket)s? #?\d+", re.IGNORECASE)
WORK_LOG = [r"\bnot run here\b", r"\bthis session\b", r"\beither session\b", r"\bwas fixed\b", r"\bno GPU was lent\b",
            r"\bwhile (this|it) was built\b", r"\bnot drawn\b", r"\bnow\b", r"\bnot run yet\b", r"\bcould not be tried "
            r"here\b"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def fenced_commands(text: str) -> list[str]:
    """The ``mla ...`` command lines of the fenced code blocks in ``text``: continuation lines (``\\``) joined,
    comments dropped."""
    commands, fence, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence, pending = not fence, ""
            continue
        if not fence:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line == "mla" or line.startswith("mla "):
            commands.append(shlex.split(line, comments=True))
    return commands


def check_command(words: list[str]) -> None:
    """Parse ``mla`` words as the CLI does, running nothing: SystemExit (non-zero) or MLAError when they are wrong."""
    argv = words[1:]
    try:
        args = parse(argv)
    except SystemExit as err:
        if err.code:  # --help exits with 0
            raise
        return
    if getattr(args, "overrides", None):
        parse_overrides(args.overrides, RecoverConfig)
    if args.convert_args:  # mla bench-convert SHAPE -- <mla convert options>
        check_command(["mla", "convert", "SRC", "OUT", *args.convert_args])
    if args.command == "convert":
        ConvertConfig(**{k: v for k, v in vars(args).items() if k in ConvertConfig.__dataclass_fields__
                         and v is not None})


def _name(path) -> str:
    return str(path.relative_to(ROOT))


ALL_COMMANDS = [(_name(path), " ".join(words)) for path in DOCS for words in fenced_commands(path.read_text())]


def test_the_documents_have_commands():
    assert len(ALL_COMMANDS) > 40
    assert {words.split()[1] for _, words in ALL_COMMANDS} >= set(COMMANDS)  # every command is shown somewhere


@pytest.mark.parametrize("where,command", ALL_COMMANDS)
def test_every_documented_command_parses(where, command, capsys):
    check_command(shlex.split(command))


@pytest.mark.parametrize("command", [
    "mla convert SRC OUT --kv-budgett 0.3",  # an unknown option
    "mla convert SRC",  # OUT missing
    "mla convert SRC OUT --kv-budget half",  # not a number
    "mla finetune CONVERTED OUT lr=2e-4 nonsense_key=1",  # not a recovery key
    "mla finetune CONVERTED OUT tokens=many",  # a wrong type
    "mla bench OUT --baseline SRC --batchsize 8",
    "mla bench-convert llama-3.2-1b -- --kv-budgett 0.25",  # what goes on to mla convert is checked too
    "mla frobnicate OUT",  # no such command
])
def test_a_wrong_command_fails_the_check(command, capsys):
    with pytest.raises((SystemExit, Exception)) as err:
        check_command(shlex.split(command))
    assert not isinstance(err.value, SystemExit) or err.value.code


def test_fenced_commands_join_continuations_and_drop_comments():
    text = "```bash\nmla convert SRC OUT \\\n    --kv-budget 0.25   # a comment\n# mla nothing\nmake demo\n```\n" \
           "mla outside a fence\n"
    assert fenced_commands(text) == [["mla", "convert", "SRC", "OUT", "--kv-budget", "0.25"]]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_LINES


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_no_ticket_numbers_or_work_log_phrases(path):
    text = path.read_text()
    assert TICKET.findall(text) == []
    found = [p for p in WORK_LOG if re.search(p, text, re.IGNORECASE)]
    assert found == []


def test_the_phrase_check_catches_them():
    assert TICKET.search("as in issue 23") and TICKET.search("Issue #7")
    assert re.search(WORK_LOG[0], "this was not run here", re.IGNORECASE)


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_every_relative_link_points_to_a_file(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert broken == []


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = [p for p in DOCS if p.parent == ROOT / "docs" and p.name != "README.md"]
    assert [_name(p) for p in pages if f"({p.name})" not in index] == []


def test_mla_help_says_what_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    assert [name for name, command in COMMANDS.items() if f"| `mla {name}` | {command.help} |" not in readme] == []
