"""Tiny random source models (2 layers, hidden 64) of each family and head layout, saved as HF folders; fresh
virtualenvs (only torch + one transformers version) to load exports in, cached across test sessions."""

import functools
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tarfile
import time
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 320
# name: (model_type, num_heads, num_kv_heads, extra config)
TINY = {
    "llama-gqa": ("llama", 4, 2, {}),
    "llama-mha": ("llama", 4, 4, {}),
    "llama-mqa": ("llama", 4, 1, {}),
    "llama-bias": ("llama", 4, 2, {"attention_bias": True}),
    "qwen2": ("qwen2", 4, 2, {}),
    "mistral": ("mistral", 4, 2, {"sliding_window": 8}),
    "qwen3": ("qwen3", 4, 2, {}),
    "gemma3": ("gemma3_text", 4, 2, {
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 24,
        "final_logit_softcapping": 30.0, "rope_theta": None,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}}),
    "gemma2": ("gemma2", 4, 2, {"sliding_window": 8, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                                "final_logit_softcapping": 3.0}),
    "phi3": ("phi3", 4, 2, {"partial_rotary_factor": 0.5}),
    "olmo2": ("olmo2", 4, 2, {}),
    "granite": ("granite", 4, 2, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                                  "attention_multiplier": 0.3}),
    "smollm3": ("smollm3", 4, 2, {"no_rope_layers": [1, 0]}),
}
# Families whose tiny models also get random norm gains (their QK-norm / sandwich norms must be read right).
RANDOM_NORMS = {"qwen3", "gemma3", "gemma2", "phi3", "olmo2", "granite", "smollm3"}


def _tokenizer(folder: Path, pre_tokenizer=None):
    """A byte-level BPE tokenizer of VOCAB ids trained on Python's docs; ``pre_tokenizer`` (a ``tokenizers`` one)
    replaces the plain GPT-2 byte-level split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import pydoc_data.topics

    text = list(pydoc_data.topics.topics.values())[:40]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def make_tiny(folder: Path, name: str, seed: int = 0, **config):
    """Save a random tiny model of kind ``name`` (see TINY, ``config``: more config settings) with a tokenizer into
    ``folder``; return the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, heads, kv_heads, extra = TINY[name]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256,
                  rope_theta=10000.0, tie_word_embeddings=(name not in ("qwen2", "phi3")), bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    kwargs.update(extra)
    kwargs.update(config)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger random weights make the attention pattern non-trivial
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # Phi-3: q | k | v rows
                attn.qkv_proj.weight[: 2 * attn.qkv_proj.weight.shape[0] // 3].mul_(8.0)
            else:
                for proj in (attn.q_proj, attn.k_proj):
                    proj.weight.mul_(8.0)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.normal_(0, 0.5)
        if name in RANDOM_NORMS:
            for mod_name, mod in model.named_modules():
                if mod_name.endswith("norm") and getattr(mod, "weight", None) is not None:
                    offset = 0.0 if "gemma" in model_type else 1.0  # Gemma's gain is 1 + weight
                    mod.weight.copy_(offset + 0.3 * torch.randn_like(mod.weight))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _tokenizer(folder)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of every tiny source model, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: _build(root / name, name) for name in TINY}


def _build(folder, name):
    make_tiny(folder, name)
    return folder


@pytest.fixture(scope="session")
def lossless(tiny_models, tmp_path_factory):
    """Every tiny source converted at --kv-budget 1."""
    root = tmp_path_factory.mktemp("lossless")
    outs = {}
    for name, src in tiny_models.items():
        convert_tiny(src, root / name, kv_budget=1.0)
        outs[name] = root / name
    return outs


def convert_tiny(src, out, **overrides):
    """Run the conversion pipeline on a tiny model with fast calibration settings."""
    from convert.config import ConvertConfig
    from convert.pipeline import convert

    settings = dict(calib="pydoc", calib_seqs=4, calib_len=64, verify_seqs=1, overwrite=True)
    settings.update(overrides)
    return convert(str(src), str(out), ConvertConfig(**settings), log=lambda *_: None)


def fresh_venv(transformers_version: str, *extra_packages: str) -> str:
    """The python of a virtualenv holding only this session's torch version, ``transformers==transformers_version``
    and ``extra_packages`` (pip requirement strings) with their dependencies: not this project.

    Cached across test sessions under ``<cache dir>/venvs`` (``$MLA_RETROFIT_CACHE`` or ``~/.cache/mla-retrofit``),
    one per (python, torch, transformers, extras) key; building one takes about a minute (torch from local disk,
    transformers from the registry) and 1.2 GB. It is built in a temporary sibling folder, gets its marker file last,
    and is renamed into place, so a half-built venv from a killed run is never used (its leftovers are removed by the
    next build of that key)."""
    from convert.cache import cache_dir

    torch_version = torch.__version__.split("+")[0]
    packages = [f"torch=={torch_version}", f"transformers=={transformers_version}", *sorted(extra_packages)]
    py_tag = "py{}.{}".format(*sys.version_info[:2])
    name = f"{py_tag}-torch{torch_version}-transformers{transformers_version}"
    if extra_packages:
        name += "-" + hashlib.sha256(json.dumps(packages[2:]).encode()).hexdigest()[:10]
    root = cache_dir("venvs")
    final = root / name
    if _venv_ready(final, packages):
        return str(final / "bin" / "python")
    for stale in root.glob(f".{name}.tmp-*"):  # left by a killed (or still running) build of this key
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        pip = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
                             capture_output=True, text=True)
        assert pip.returncode == 0, f"pip install {' '.join(packages)} failed:\n{pip.stderr[-3000:]}"
        _relocate_scripts(tmp, final)
        (tmp / MARKER).write_text(json.dumps({"packages": packages}) + "\n")  # last: the venv is complete
        try:
            tmp.rename(final)
        except OSError:  # another session built it meanwhile (or a broken one is in the way)
            if not _venv_ready(final, packages):
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert _venv_ready(final, packages), final
    return str(final / "bin" / "python")


MARKER = "mla-retrofit-venv.json"  # written last into a complete cached venv


def _venv_ready(venv: Path, packages: list) -> bool:
    try:
        ok = json.loads((venv / MARKER).read_text())["packages"] == packages
    except (OSError, ValueError, KeyError):
        return False
    return ok and os.access(venv / "bin" / "python", os.X_OK)  # the base interpreter may have moved away


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _relocate_scripts(built: Path, final: Path) -> None:
    """Point the console scripts' shebangs (and activate scripts) of a venv built at ``built`` to ``final``."""
    old, new = str(built).encode(), str(final).encode()
    for script in (built / "bin").iterdir():
        if script.is_symlink() or not script.is_file() or script.stat().st_size > 1 << 20:
            continue
        data = script.read_bytes()
        if old in data:
            script.write_bytes(data.replace(old, new))


# --- shared by the error and safety tests --------------------------------------------------------------------

FAST = ["--calib", "pydoc", "--calib-seqs", "2", "--calib-len", "32", "--verify-seqs", "1"]


@pytest.fixture
def _no_progress_output(monkeypatch):
    """Progress bars (ours and transformers') and transformers' load report are not error output: silence them."""
    import convert.allocate
    import convert.calibrate
    import convert.layerwise
    from transformers.utils import logging as hf_logging

    for module in (convert.layerwise, convert.calibrate, convert.allocate):
        monkeypatch.setattr(module, "tqdm", lambda iterable, **kwargs: iterable)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()


def leftovers(out):
    """Temporary siblings of OUT left behind by an atomic write."""
    siblings = out.parent.iterdir() if out.parent.is_dir() else []
    return sorted(p.name for p in siblings if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")))


def assert_error(code, err, out, *keywords, exit_code=2, out_exists=False):
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in keywords:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert out.exists() == out_exists
    assert leftovers(out) == []


ROOT = Path(__file__).resolve().parent.parent


def digest(path: Path) -> dict:
    """{relative path: sha256} of every file under ``path`` (or of the file itself), plus the folder layout."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def one_error(code, err, *words, exit_code=2):
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "TRANSFORMERS_VERBOSITY": "error", **extra}


def run_main(capsys, *args):
    """``mla ARGS`` in this process (``convert.cli.main``, as the console script runs it): (exit code, stderr). For
    checks of what a command refuses; ``cli`` runs it in a subprocess where the process itself matters."""
    from convert.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    return code, capsys.readouterr().err


def main_on_one_thread(*args) -> int:
    """``mla ARGS`` in this process on one CPU thread, as the tests' ``mla`` processes run (``OMP_NUM_THREADS=1``): the
    uninterrupted reference a killed and resumed process's result must equal bit for bit; its exit code (its output
    goes to the test's captured output)."""
    from convert.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def cli(*args, timeout=300):
    """``python -m convert.cli ARGS`` in a subprocess: (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "convert.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stderr


def _edit_config(src: Path, folder: Path, **changes) -> Path:
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _paused_convert(src: Path, out: Path, seconds: float, *flags, release: Path | None = None) -> subprocess.Popen:
    """``mla convert`` in a subprocess that pauses once its export is complete in the temporary folder: ``seconds``,
    or until the file ``release`` exists."""
    code = ("import os, time, convert.export as p\n"
            "real = p.write_json\n"
            "def paused(*a, **k):\n"
            "    real(*a, **k)\n"
            "    end = time.time() + %r\n"
            "    while time.time() < end and not (%r and os.path.exists(%r)):\n"
            "        time.sleep(0.05)\n"
            "p.write_json = paused\n"
            "from convert.cli import main\n"
            "raise SystemExit(main(['convert', %r, %r, *%r]))\n"
            % (seconds, bool(release), str(release), str(src), str(out), [*FAST, *flags]))
    return subprocess.Popen([sys.executable, "-c", code], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_export_in_temp(out: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not list(out.parent.glob(f".{out.name}.tmp-*/mla_conversion.json")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)


def _permission_bits_apply() -> list[str]:
    """A command prefix under which permission bits apply: root drops the capabilities that bypass them."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def fake_bigbench_sdist(path: Path, broken_json: bool = False) -> Path:
    """A stand-in for the bigbench sdist: the same layout, a few examples in BIG-bench's format."""
    from eval import bigbench

    mc = {"task_prefix": "", "examples": [
        {"input": f"Question {i}?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1), "maybe": 0}}
        for i in range(10)] + [{"input": "tie", "target_scores": {"a": 1, "b": 1}}]}
    twins = {"examples": [{"input": "Context Word: box.", "target": [
        f"Sentence 1: The cup {i} fit in the box because the _ was small. \nAnswer1: cup. \n"
        f"Sentence 2: The cup {i} fit in the box because the _ was big. \nAnswer2: box.", "not a twin"]}
        for i in range(5)]}
    timedial = {"example_input_prefix": "\nQuestion: ", "example_output_prefix": "\n<MASK> phrase: ",
                "examples": mc["examples"]}
    contents = {"natural_instructions/subtask029_winogrande_full_object": twins, "timedial": timedial}
    with tarfile.open(path, "w:gz") as t:
        for folder in bigbench.TASKS.values():
            data = b"{not json" if broken_json else json.dumps(contents.get(folder, mc)).encode()
            info = tarfile.TarInfo(bigbench.PREFIX + folder + "/task.json")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def bigbench_standin(tmp_path, monkeypatch):
    """BIG-bench tasks from a stand-in sdist (10 documents a task) in a cache of this test's own, for tests of the
    lm-eval tasks' mechanics: the real sdist is 358 MB (and no longer on PyPI); the user cache is left alone. Returns
    the environment variables set (a subprocess inherits them through ``os.environ``)."""
    from eval import bigbench

    env = {"MLA_RETROFIT_CACHE": str(tmp_path / "bb-cache"),
           "MLA_BIGBENCH_SDIST": str(fake_bigbench_sdist(tmp_path / bigbench.SDIST))}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def calibrate_tiny(src, spill_dir, seq_len: int = 64, n_seqs: int = 4, batch_size: int = 2, gradients: bool = True):
    """``(reader, layout, stats per layer, windows)``: the statistics ``convert.calibrate.sweep`` gathers on a tiny
    source (``n_seqs`` pydoc windows of ``seq_len`` tokens), with gradients unless told otherwise."""
    from transformers import AutoConfig, AutoTokenizer

    from convert.adapters import read_layout
    from convert.calibrate import sweep
    from convert.data import load_texts, token_windows
    from convert.layerwise import LayerwiseModel, Spill
    from convert.readers import SafetensorsReader

    config = AutoConfig.from_pretrained(src)
    layout = read_layout(config)
    reader = SafetensorsReader(src)
    lw = LayerwiseModel(config, reader, "cpu", torch.float32, layout.layer_types)
    windows = token_windows(AutoTokenizer.from_pretrained(src), load_texts("pydoc"), seq_len, n_seqs, seed=0)
    stats = [None] * layout.num_layers
    sweep(lw, layout, windows, batch_size, gradients, stats.__setitem__, Spill(spill_dir, 0))
    return reader, layout, stats, windows


def psd_root(c: torch.Tensor) -> torch.Tensor:
    """``F`` with ``F F^T = c`` (c symmetric PSD)."""
    evals, evecs = torch.linalg.eigh(c)
    return evecs * evals.clamp_min(0).sqrt()


def reference_factorization(z, n_key: int, rank: int, method: str, zs) -> torch.Tensor:
    """``B A`` (D, d+1) of a rank-``rank`` factorization of ``Z = z x~``, written from each method's definition:
    the latent spans the top ``rank`` directions of ``L C^1/2`` (a whitened SVD; ``L z`` for svd), the
    up-projection is ``L^-1 P`` or, for fisher, the least-squares fit of the keys under ``C_k`` and of the values
    under ``C_v`` (torch.linalg.lstsq). For fisher ``L^T L = G`` (a Cholesky factor: any square root of the
    metric gives the same latent)."""
    total = z.shape[0]
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    if method == "fisher":
        trace_s = (zs.trace_k + zs.trace_v) / 2
        roots = []
        for grad, trace_own in ((zs.grad_k, zs.trace_k), (zs.grad_v, zs.trace_v)):
            n = grad.shape[0]
            g = (grad + 1e-2 * torch.trace(grad) / n * eye(n)) * (trace_own / trace_s)
            roots.append(torch.linalg.cholesky(g).T)
        metric, cov = torch.block_diag(*roots), (zs.cov_k + zs.cov_v) / 2
    else:  # keys scaled so that K and V carry equal energy
        cov = zs.cov
        alpha = math.sqrt(float(torch.trace(cov[n_key:, n_key:]) / torch.trace(cov[:n_key, :n_key])))
        metric = torch.diag(torch.tensor([alpha] * n_key + [1.0] * (total - n_key), dtype=torch.float64))
    target = metric @ z if method == "svd" else metric @ psd_root(cov)
    basis = torch.linalg.svd(target, full_matrices=False).U[:, :rank]  # (D, r)
    down = basis.T @ metric @ z
    if method != "fisher":
        return torch.linalg.solve(metric, basis) @ down
    proj = basis.T @ metric  # (r, D): the latent of Z
    ups = []
    for rows, weight in ((slice(0, n_key), zs.cov_k), (slice(n_key, total), zs.cov_v)):
        f = psd_root(weight)  # argmin_B |(I[rows] - B proj) f|_F
        ups.append(torch.linalg.lstsq((proj @ f).T, f[rows].T).solution.T)
    return torch.cat(ups) @ down


def write_tiny_gguf(folder: Path, path: Path) -> Path:
    """Write the tiny Llama-layout model in ``folder`` (a ``make_tiny`` folder) as an F32 GGUF at ``path`` the way
    llama.cpp's convert_hf_to_gguf.py does: its metadata keys, its tensor names, q/k rows permuted to interleaved
    rotary pairs, the byte-level BPE tokenizer (``convert.gguf_vocab``); no output tensor when the head is tied."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from convert.gguf_vocab import add_tokenizer

    cfg = json.loads((folder / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, n):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    add_tokenizer(writer, folder, cfg["vocab_size"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, t in load_file(folder / "model.safetensors").items():
        t = t.float().numpy()
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                t = permute(t, heads)
            elif module == "self_attn.k_proj":
                t = permute(t, kv_heads)
            name = f"blk.{i}.{layer_names[module]}.{kind}"
        else:
            name = names[name]
        writer.add_tensor(name, np.ascontiguousarray(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@functools.lru_cache(maxsize=1)
def lm_eval_tasks(include_path: str):
    """An lm-eval TaskManager that also knows the tasks in ``include_path``, kept for the next call with the same path
    (it indexes every task definition lm-eval ships: seconds and ~80 MiB each time); task objects are built anew by
    each ``load``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def multiple_choice_accuracy(model_dir, task_name: str, limit: int, include_path) -> tuple[float, dict]:
    """(accuracy, {doc_id: [log-likelihood per choice]}) of the lm-eval multiple-choice task ``task_name`` (from
    ``include_path``) over its first ``limit`` documents, scored here with plain forwards of ``model_dir``: each
    choice's summed log-probabilities after the prompt (lm-eval's prompts and its split of a context's trailing spaces
    into the continuation, no special tokens), a hit when the best choice is the document's target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    task = lm_eval_tasks(str(include_path)).load([task_name])["tasks"][task_name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    docs = {}
    for inst in task.instances:
        docs.setdefault(inst.doc_id, (inst.doc, {}))[1][inst.idx] = inst.args
    lls, hits = {}, []
    for doc_id, (doc, args) in sorted(docs.items()):
        lls[doc_id] = []
        for _, (context, continuation) in sorted(args.items()):
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tok.encode(context + continuation, add_special_tokens=False)
            n = len(tok.encode(context, add_special_tokens=False))
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0, n - 1:-1].log_softmax(-1)
            lls[doc_id].append(logp.gather(-1, torch.tensor(whole[n:])[:, None]).sum().item())
        hits.append(max(range(len(lls[doc_id])), key=lls[doc_id].__getitem__) == task.doc_to_target(doc))
    return sum(hits) / len(hits), lls


def assembled_reference_error(reader, layout, stats, cfg) -> float:
    """Largest relative error, over layers and heads, of the converter's assembled latent against
    ``reference_factorization`` of each layer's rotated problem ``Z = blockdiag(R_nope, I) [k; v]``.

    ``cfg`` fixes ``kv_lora_rank`` and ``rope_dim``. Compared per head: the no-RoPE key map and the value map, each
    its rows of kv_b_proj times the latent rows of the down-projection. Without QK-norm the problem is on the input
    ``x~`` (``z = [R_nope K; V]``, biases dropped); with QK-norm it is on ``y = [k_norm(k); v]`` (``z`` the transform)
    and the converter reads the keys through k_a_proj and folds v_proj into kv_a_proj_with_mqa, so the reference's
    value columns are multiplied by v_proj here."""
    from convert.allocate import check_plan, layer_converter
    from convert.assemble import read_attention, rope_theta
    from convert.factorize import LatentStats
    from convert.layerwise import Spill
    from convert.ropesplit import rope_split

    out = {}
    conv = layer_converter(layout, cfg, check_plan(layout, cfg), reader, lambda i, t, _: out.__setitem__(i, t),
                           Spill("/nonexistent", float("inf")))
    for i, st in enumerate(stats):
        conv.add(i, st)
    conv.finish()
    g, d_h, n_h = layout.num_kv_heads, layout.head_dim, layout.num_heads
    rank, d_rope, kv_dim = cfg.kv_lora_rank, cfg.rope_dim, layout.num_kv_heads * layout.head_dim
    worst = 0.0
    for i, st in enumerate(stats):
        w = read_attention(reader, i, layout)
        split = rope_split(st, g, d_h, n_h, d_rope, cfg.rope_method, rope_theta(layout, i), cfg.rope_span)
        r_nope = split.rotation[d_rope:]
        n_key = r_nope.shape[0]
        transform = torch.block_diag(r_nope, torch.eye(kv_dim, dtype=torch.float64))
        zs = LatentStats.of(st, transform, r_nope)
        if layout.qk_norm:
            ref = reference_factorization(transform, n_key, rank, cfg.factor_method, zs)  # (D, 2 g d_h) on y
            expected = torch.cat((ref[:, :kv_dim], ref[:, kv_dim:] @ w.v_aug[:, :-1]), dim=1)  # on [k_norm(k); x]
            latent = torch.cat((out[i]["k_a_proj.weight"][:rank], out[i]["kv_a_proj_with_mqa.weight"][:rank]), dim=1)
        else:
            z = torch.cat((r_nope @ w.k_aug, w.v_aug))
            expected = reference_factorization(z, n_key, rank, cfg.factor_method, zs)[:, :-1]  # no biases
            latent = out[i]["kv_a_proj_with_mqa.weight"][:rank]
        kv_b = out[i]["kv_b_proj.weight"].view(n_h, 2 * d_h, rank)
        for h in range(n_h):
            cols = slice(h // (n_h // g) * d_h, (h // (n_h // g) + 1) * d_h)
            for got, want in ((kv_b[h, :d_h] @ latent, r_nope[:, cols].T @ expected[:n_key]),
                              (kv_b[h, d_h:] @ latent, expected[n_key:][cols])):
                worst = max(worst, float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
    return worst


def converted_with_texts(tiny_models, root: Path) -> Path:
    """``root`` holding a tiny GQA model converted at budget 0.25 (``conv``) and disjoint training / validation text
    files (``train.txt``, ``val.txt``: Python docs): what the recovery tests train on."""
    import pydoc_data.topics

    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
    (root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
    convert_tiny(tiny_models["llama-gqa"], root / "conv", kv_budget=0.25)
    return root
