"""The walk of one command through the project's files: which file runs, in order, and how often a file is re-entered.

    .venv/bin/python tools/walk.py [--json F] -- convert SRC OUT --kv-budget 0.5 ...

Runs ``mla <args>`` in this process under ``sys.setprofile`` and records the file of every project function called
(comprehensions and lambdas belong to the function around them). Consecutive calls in one file are one visit. A
*return* is a visit to a file that had already been visited and left. The *stage walk* leaves out the base files
that every stage may call (errors, cache, files, device); it is the order in which the stages run.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("convert", "eval", "mla_modeling")
BASE = {"convert/errors.py", "convert/cache.py", "convert/files.py", "convert/device.py"}
ORCHESTRATOR = "convert/pipeline.py"
ENTRY = {"convert/cli.py", "convert/commands.py", "convert/recover/run.py"}  # the doors that call an orchestrator
SKIP = {"<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>", "<lambda>", "<module>"}


def record(argv: list[str], orchestrator: str = ORCHESTRATOR) -> tuple[list[str], list[str], list[str]]:
    """(every visit, the orchestrator's calls, the calls back into the orchestrator): project files in call order."""
    files, orchestrated, callbacks = [], [], []
    prefix = str(ROOT) + "/"

    def project_file(frame):
        while frame is not None and frame.f_code.co_name in SKIP:
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(prefix):
            return None
        rel = frame.f_code.co_filename[len(prefix):]
        return rel if rel.split("/", 1)[0] in PACKAGES else None

    def profile(frame, event, arg):
        if event != "call" or frame.f_code.co_name in SKIP:
            return
        rel = project_file(frame)
        if rel is None:
            return
        if not files or files[-1] != rel:
            files.append(rel)
        caller = project_file(frame.f_back)
        if caller == orchestrator and rel != orchestrator:
            orchestrated.append(rel)
        elif rel == orchestrator and caller not in (None, orchestrator) and caller not in ENTRY:
            callbacks.append(f"{caller} -> {frame.f_code.co_name}")

    from convert.cli import main

    sys.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
    if code:
        raise SystemExit(f"mla {' '.join(argv)} exited with {code}")
    return files, orchestrated, callbacks


def summary(visits: list[str]) -> dict:
    seen, returns = set(), Counter()
    for i, f in enumerate(visits):
        if f in seen:
            returns[f] += 1
        seen.add(f)
    return {"files": len(seen), "visits": len(visits), "returns": sum(returns.values()),
            "returns_by_file": dict(returns.most_common()), "walk": visits}


def collapse(visits: list[str]) -> list[str]:
    out = []
    for f in visits:
        if not out or out[-1] != f:
            out.append(f)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write both walks to this file")
    parser.add_argument("--orchestrator", default=ORCHESTRATOR,
                        help=f"the file whose direct calls make the orchestrator's walk (default {ORCHESTRATOR})")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the mla command line")
    a = parser.parse_args()
    argv = a.args[1:] if a.args[:1] == ["--"] else a.args
    visits, orchestrated, callbacks = record(argv, a.orchestrator)
    result = {"all": summary(visits), "orchestrator": summary(collapse([f for f in orchestrated if f not in BASE])),
              "callbacks_into_orchestrator": callbacks}
    for key in ("all", "orchestrator"):
        r = result[key]
        print(f"{key}: {r['files']} files, {r['visits']} visits, {r['returns']} returns {r['returns_by_file']}")
    print("orchestrator walk:", " > ".join(Path(f).stem for f in result["orchestrator"]["walk"]))
    print(f"calls back into {a.orchestrator}: {len(callbacks)} {sorted(set(callbacks))}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
