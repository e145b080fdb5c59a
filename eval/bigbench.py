"""Multiple-choice evaluation data from BIG-bench's ``task.json`` files, prepared offline from PyPI.

    python -m eval.bigbench            # download + extract once (prints where), then list the tasks

The ``bigbench==1.0.0`` sdist (358 MB) is fetched from the package index (``$PIP_INDEX_URL`` or PyPI) by its
sha256-pinned link, never installed: only the ``task.json`` files named in ``TASKS`` are extracted into the user
cache (``convert.cache.cache_dir("data", "bigbench")``) and the archive is deleted. ``$MLA_BIGBENCH_SDIST`` may name
a local copy of the sdist instead. BIG-bench data carries a canary string: evaluate on it, never train on it.

Each task becomes a list of docs ``{"id", "question", "choices", "label"}`` (winogrande: ``{"id", "contexts",
"continuation", "label"}``, scored like lm-eval's winogrande: the option is in the context, the rest of the sentence
is the continuation), shuffled with a fixed seed so that ``--limit N`` takes a random sample, and capped at
``MAX_DOCS`` so that a full run stays affordable on a CPU.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import random
import re
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

from convert.cache import cache_dir
from convert.errors import MLAError

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_MAX_BYTES = 400_000_000  # the sdist is 358 MB: a larger download is stopped before the hash check
PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MAX_DOCS = 2000
SEED = 0

# name -> BIG-bench task folder. Chosen because a 100M-parameter model scores clearly above chance on them when
# every option is scored by its log-likelihood (so a conversion's loss shows), and they cover different skills.
TASKS = {
    "winogrande": "natural_instructions/subtask029_winogrande_full_object",  # coreference / commonsense, 2 options
    "social_iqa": "social_iqa",  # social commonsense, 3 options
    "goal_step": "goal_step_wikihow/goal_inference",  # procedural knowledge (wikiHow), 4 options
    "timedial": "timedial",  # temporal commonsense in dialogues, 3 options
}
_DONE = ".complete"


class _TooLarge(Exception):
    pass


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/") + "/bigbench/"


def _download(dest: Path) -> Path:
    """The sdist at ``dest`` (fetched through the PEP 503 index page, sha256-checked), or MLAError."""
    page_url = _index_url()
    try:
        page = page_url + "index.html" if page_url.startswith("file:") else page_url  # a local PEP 503 folder
        with urllib.request.urlopen(page, timeout=60) as r:
            parser = _Links()
            parser.feed(r.read().decode("utf-8", "replace"))
        link = next(u for u in parser.links if urllib.parse.urlsplit(u).path.rsplit("/", 1)[-1] == SDIST)
        url = urllib.parse.urljoin(page_url, link.split("#")[0])
        part = dest.with_suffix(".part")
        digest = hashlib.sha256()
        size = 0
        with urllib.request.urlopen(url, timeout=120) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                size += len(chunk)
                if size > SDIST_MAX_BYTES:
                    raise _TooLarge
                digest.update(chunk)
                f.write(chunk)
    except _TooLarge:
        part.unlink(missing_ok=True)
        raise MLAError(f"BIG-bench data: {SDIST} grew past {SDIST_MAX_BYTES / 1e6:.0f} MB; stopped") from None
    except StopIteration:
        raise MLAError(f"BIG-bench data: {page_url} lists no {SDIST}") from None
    except OSError as e:
        raise MLAError(f"BIG-bench data: cannot download {SDIST} from {page_url}: {e}") from None
    if digest.hexdigest() != SDIST_SHA256:
        part.unlink(missing_ok=True)
        raise MLAError(f"BIG-bench data: {SDIST} has sha256 {digest.hexdigest()}, expected {SDIST_SHA256}")
    os.replace(part, dest)
    return dest


def data_root() -> Path:
    """The folder of extracted ``task.json`` files, downloading and extracting them on first use."""
    root = cache_dir("data", "bigbench")
    if (root / _DONE).exists():
        return root
    local = os.environ.get("MLA_BIGBENCH_SDIST")
    sdist = Path(local) if local else cache_dir("downloads", "bigbench") / SDIST
    if not sdist.is_file():
        if local:
            raise MLAError(f"BIG-bench data: $MLA_BIGBENCH_SDIST={local} is not a file")
        print(f"BIG-bench data: downloading {SDIST} (PyPI sdist bigbench==1.0.0, 358 MB, sha256 {SDIST_SHA256[:12]}...) "
              f"into {sdist.parent} (once; only the task files are kept)", file=sys.stderr)
        _download(sdist)
    wanted = {PREFIX + folder + "/task.json": folder for folder in TASKS.values()}
    try:
        with tarfile.open(sdist) as t:
            for m in t:
                if m.name in wanted and m.isfile():
                    out = root / wanted.pop(m.name) / "task.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(t.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MLAError(f"BIG-bench data: cannot read {sdist}: {e}") from None
    if wanted:
        raise MLAError(f"BIG-bench data: {sdist} has no {', '.join(sorted(wanted))}")
    (root / _DONE).touch()
    if not local:
        sdist.unlink(missing_ok=True)  # only the extracted files are kept
    return root


def _task_json(name: str) -> dict:
    if name not in TASKS:
        raise MLAError(f"unknown BIG-bench task {name!r} (choose from {', '.join(TASKS)})")
    path = data_root() / TASKS[name] / "task.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MLAError(f"BIG-bench data: cannot read {path}: {e} (delete {path.parent.parent} to fetch it again)"
                       ) from None


def _multiple_choice(task: dict) -> list[dict]:
    """BIG-bench JSON multiple choice: the prompt is the task's own prefixes around ``input``; one best option."""
    prefix = task.get("task_prefix", "")
    q_prefix = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    a_prefix = task.get("example_output_prefix", "\nA: ").rstrip()
    docs = []
    for e in task["examples"]:
        scores = e.get("target_scores")
        if not scores or len(scores) < 2:
            continue
        choices = [c.strip() for c in scores]
        best = max(scores.values())
        if list(scores.values()).count(best) != 1 or len(set(choices)) != len(choices):
            continue  # no single right answer
        docs.append({"question": f"{prefix}{q_prefix}{e['input'].strip()}{a_prefix}", "choices": choices,
                     "label": list(scores.values()).index(best)})
    return docs


_TWIN = re.compile(r"Sentence 1:\s*(.*?)\s*\n\s*Answer1:\s*(.*?)\s*\n\s*"
                   r"Sentence 2:\s*(.*?)\s*\n\s*Answer2:\s*(.*?)\s*$", re.S)


def _winogrande(task: dict) -> list[dict]:
    """Twin sentences written for WinoGrande (natural_instructions): each sentence is a 2-option doc."""
    docs, seen = [], set()
    for e in task["examples"]:
        for target in e["target"]:
            m = _TWIN.match(target.strip())
            if not m:
                continue
            s1, a1, s2, a2 = (g.strip() for g in m.groups())
            a1, a2 = a1.rstrip(". "), a2.rstrip(". ")
            if not a1 or not a2 or a1 == a2 or s1.count("_") != 1 or s2.count("_") != 1 or (s1, s2) in seen:
                continue
            seen.add((s1, s2))
            pair = []
            for label, s in enumerate((s1, s2)):
                i = s.index("_")
                pair.append({"contexts": [s[:i] + a1, s[:i] + a2], "continuation": s[i + 1:].strip(),
                             "label": label})
            docs.append(pair)
    random.Random(SEED).shuffle(docs)
    return [d for pair in docs[: MAX_DOCS // 2] for d in pair]  # twins stay together


def load_docs(name: str) -> list[dict]:
    """The docs of task ``name`` (see ``TASKS``), shuffled with a fixed seed and capped at ``MAX_DOCS``."""
    task = _task_json(name)
    if name == "winogrande":
        docs = _winogrande(task)
    else:
        docs = _multiple_choice(task)
        random.Random(SEED).shuffle(docs)
        docs = docs[:MAX_DOCS]
    if not docs:
        raise MLAError(f"BIG-bench task {name!r} has no usable examples")
    return [{"id": i, **d} for i, d in enumerate(docs)]


def main() -> int:
    try:
        root = data_root()
        for name in TASKS:
            print(f"{name:<12} {len(load_docs(name)):>5} docs  {root / TASKS[name] / 'task.json'}")
    except MLAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
