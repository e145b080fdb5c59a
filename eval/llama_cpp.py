"""llama.cpp at a pinned release, built from source once (CPU) and cached: what the GGUF tests and benchmarks run.

The source is the copy vendored in the ``llama-cpp-python`` sdist on PyPI (``PIN``; its CHANGELOG names the
llama.cpp commit), so it comes through pip like every other dependency. ``binary(name)`` returns a built tool,
building what is missing first: the sdist is downloaded once, its ``vendor/llama.cpp`` extracted, configured with
cmake (native CPU, no network features) and only the needed targets compiled, all under
``<cache>/llama.cpp/llama-cpp-python-<PIN>/`` with a lock, so concurrent runs wait for one build. A new ``PIN``
builds in a new folder. The first build takes about 10-15 minutes on 2 cores; later calls return at once.

A *variant* is the same source with one patch of ``docs/llama-cpp-patches/`` applied (an engine experiment, never
what the tests or benchmarks run unless asked); it builds in a folder of its own named after the patch's hash.

    python -m eval.llama_cpp            # build (or find) the tools, print their folder
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from convert.cache import cache_dir
from convert.errors import MLAError
from convert.files import out_lock
from convert.sources import resolve_source

PIN = "0.3.36"  # llama-cpp-python sdist; vendors ggml-org/llama.cpp@0c1e57098
COMMIT = "0c1e57098"
TARGETS = ("llama-perplexity", "llama-bench", "llama-batched-bench", "llama-simple", "llama-quantize",
           "llama-tokenize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF")


PATCHES = Path(__file__).resolve().parents[1] / "docs" / "llama-cpp-patches"


def patch_file(variant: str) -> Path:
    path = PATCHES / f"{variant}.patch"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in PATCHES.glob("*.patch"))) or "none"
        raise MLAError(f"no llama.cpp patch named {variant!r} in {PATCHES} (have: {have})")
    return path


def root(variant: str | None = None) -> Path:
    if not variant:
        return cache_dir("llama.cpp", f"llama-cpp-python-{PIN}")
    digest = hashlib.sha256(patch_file(variant).read_bytes()).hexdigest()[:12]
    return cache_dir("llama.cpp", f"llama-cpp-python-{PIN}+{variant}-{digest}")


def bin_dir(variant: str | None = None) -> Path:
    return root(variant) / "build" / "bin"


def _run(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "ab") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise MLAError(f"{what} failed (exit {done.returncode}; log {log}): {tail[0]}")


def _fetch_source(dest: Path, patch: Path | None = None) -> None:
    """``vendor/llama.cpp`` of the pinned sdist into ``dest``, with ``patch`` applied (built in a temporary sibling,
    then renamed)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".src.tmp-") as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={PIN}", "-d", str(tmp)], dest.parent / "fetch.log", "downloading llama-cpp-python")
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{PIN}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp / "x", members=members, filter="data")
        if patch is not None:
            _run(["patch", "-p1", "--forward", "-d", str(tmp / "x" / prefix), "-i", str(patch)],
                 dest.parent / "fetch.log", f"applying {patch.name}")
        os.replace(tmp / "x" / prefix.rstrip("/"), dest)


def _missing(targets, variant: str | None = None) -> list[str]:
    return [t for t in targets if not (bin_dir(variant) / t).is_file()]


def build(targets=TARGETS, log=print, variant: str | None = None) -> Path:
    """Build the missing ``targets`` (downloading the source first if needed) of the pinned release, or of its
    ``variant`` (a patch in docs/llama-cpp-patches); returns the folder of binaries."""
    if not _missing(targets, variant):
        return bin_dir(variant)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise MLAError(f"building llama.cpp needs {tool} (Debian: apt-get install cmake g++)")
    base = root(variant)
    with out_lock(base / "build", what="the llama.cpp build", wait=True):
        missing = _missing(targets, variant)
        if not missing:
            return bin_dir(variant)
        src = base / "src"
        if not (src / "CMakeLists.txt").is_file():
            log(f"llama.cpp: fetching the source of llama-cpp-python=={PIN} (llama.cpp {COMMIT}) into {base}")
            shutil.rmtree(src, ignore_errors=True)
            _fetch_source(src, patch_file(variant) if variant else None)
        log(f"llama.cpp: building {', '.join(missing)} (the first build takes about 10-15 minutes on 2 cores; "
            f"log {base / 'build.log'})")
        _run(["cmake", "-S", str(src), "-B", str(base / "build"), *CMAKE_FLAGS], base / "build.log", "cmake configure")
        jobs = str(os.cpu_count() or 2)
        _run(["cmake", "--build", str(base / "build"), "-j", jobs, "--target", *missing], base / "build.log",
             "building llama.cpp")
    return bin_dir(variant)


def binary(name: str, variant: str | None = None) -> Path:
    """The path of the llama.cpp tool ``name`` (one of TARGETS), built first if needed."""
    if name not in TARGETS:
        raise MLAError(f"unknown llama.cpp tool {name!r} (one of {', '.join(TARGETS)})")
    return build(variant=variant) / name


def env(variant: str | None = None) -> dict:
    """The environment llama.cpp's tools run in: their shared libraries next to them."""
    out = dict(os.environ)
    out["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(bin_dir(variant)), out.get("LD_LIBRARY_PATH")]))
    return out


def convert_original(folder: Path, out: Path, outtype: str = "f16") -> Path:
    """The original model ``folder`` as llama.cpp's own converter writes it (``convert_hf_to_gguf.py`` of the pinned
    source with its own gguf-py; Llama-family vocabularies need the ``sentencepiece`` package: the ``llama-cpp``
    extra)."""
    build()
    src = root() / "src"
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise MLAError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder}: {tail}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.llama_cpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--original", nargs=2, metavar=("SRC", "OUT.gguf"),
                   help="also write SRC (a model folder or built-in name) as a GGUF with llama.cpp's own converter")
    p.add_argument("--outtype", default="f16", help="with --original: f32, f16, bf16 or q8_0")
    args = p.parse_args(argv)
    print(build())
    if args.original:
        print(convert_original(resolve_source(args.original[0]).local, Path(args.original[1]), args.outtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
