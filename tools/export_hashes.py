"""Hash the exports of every tiny family (and SmolLM2-135M at 0.3125) so a refactor can show them bit-identical.

    .venv/bin/python tools/export_hashes.py OUT.json [--smollm2] [--work DIR]

Each tiny model is built from tests/conftest.py's ``make_tiny`` (seed 0) and converted with ``mla convert`` in a
child process, the way users run it. Every file of an export is hashed; the conversion record is hashed without its
timings (``elapsed_s``, ``profile``) and its source path. Compare two runs with ``diff``.
"""
import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--calib", "pydoc", "--calib-seqs", "4", "--calib-len", "64", "--verify-seqs", "1"]
VOLATILE = {"elapsed_s", "profile", "source"}


def _record_digest(path: Path) -> str:
    record = json.loads(path.read_text())
    kept = {k: v for k, v in record.items() if k not in VOLATILE}
    if isinstance(kept.get("verify"), dict):
        kept["verify"] = {k: v for k, v in kept["verify"].items() if not k.endswith("_s")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def hashes(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(folder))
            out[name] = (_record_digest(path) if path.name == "mla_conversion.json"
                         else hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def convert(src, out: Path, *flags) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "mla"), "convert", str(src), str(out), "--overwrite", *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return hashes(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M at --kv-budget 0.3125")
    parser.add_argument("--work", help="folder for the tiny models and exports (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY, make_tiny

    work = Path(args.work or tempfile.mkdtemp(prefix="mla-hashes-"))
    result = {}
    for name in TINY:
        src = work / "src" / name
        if not src.exists():
            make_tiny(src, name)
        result[f"{name}/0.5"] = convert(src, work / "out" / name, *FAST, "--kv-budget", "0.5")
        print(name, flush=True)
    src = work / "src" / "llama-gqa"
    result["llama-gqa/1.0"] = convert(src, work / "out" / "gqa-1", *FAST, "--kv-budget", "1")
    result["llama-gqa/deepseek_v3"] = convert(src, work / "out" / "gqa-ds", *FAST, "--format", "deepseek_v3")
    result["llama-mha/deepseek_v3"] = convert(work / "src" / "llama-mha", work / "out" / "mha-ds", *FAST,
                                           "--format", "deepseek_v3", "--kv-budget", "0.25")
    if args.smollm2:
        result["smollm2-135m/0.3125"] = convert("smollm2-135m", work / "out" / "smollm2", "--kv-budget", "0.3125")
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{len(result)} exports hashed into {args.out}")


if __name__ == "__main__":
    main()
