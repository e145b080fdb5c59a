"""The end of a run: the merged weights, this package's remote code and the peft adapter written atomically to OUT
and checked, loaded as a user loads them, against the trained model, with the ``recovery`` record in
``mla_conversion.json`` and the validation curve in ``recovery.png``."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import HEAD
from ..card import CARD, command_line, write_card
from ..deepseek import write_deepseek_v3
from ..errors import MLAError
from ..files import atomic_dir
from ..nll import token_nll
from ..save import AUTO_MAP, REMOTE_CODE_FILES, copy_remote_code, save_state_dict, write_json
from .config import RecoverConfig
from .models import output_format


ADAPTER_DIR = "adapter"
# What OUT gets anew, never from CONVERTED: the weights, the config, the remote code, the record and the plot.
WRITTEN = ("config.json", "mla_conversion.json", "recovery.png", CARD, *REMOTE_CODE_FILES)


def _final_loss(history: list[dict], key: str, last: int = 10) -> float | None:
    tail = [h[key] for h in history[-last:]]
    return sum(tail) / len(tail) if tail else None


def write_recovered(model, converted: Path, out: Path, record: dict, cfg: RecoverConfig, teacher: str, history, evals,
            n_train: int, overwrite: bool, val, micro: int, acc, started: float, ckpt_dir: Path,
            local: dict | None = None, facts: dict | None = None) -> dict:
    """Write OUT atomically: the adapter, the merged weights, the converted model's other files, the record (after
    checking the export, loaded as a user loads it, against the trained model on ``val``, or without it on random
    tokens; ``facts`` of the run join it, e.g. its memory) and the plot. Returns the new record."""
    fmt = output_format(converted, cfg)
    model.eval()
    dtype = getattr(torch, str(record.get("method", {}).get("dtype", "float32")), torch.float32)
    windows = val if val is not None else _random_windows(model.config.vocab_size, cfg)
    with acc.autocast():  # before the merge: what the trained model itself gives every token checked
        trained = token_nll(model, windows, micro, desc="check")
    frozen = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad),
                  torch.float32)  # the embeddings' (and so the residual stream's) dtype in training
    with atomic_dir(out, overwrite) as tmp:
        _save_adapter(model, tmp, converted, ckpt_dir, cfg.adapters)
        config = _save_merged(model, tmp, dtype, cfg.adapters)
        _write_files(converted, tmp, fmt, config)
        verify = _verify(model, tmp, fmt, windows, trained, micro, acc, dtype, frozen)
        verify["tokens"] = "val_data" if val is not None else "random"
        record = dict(record)
        record["format"] = fmt
        record["recovery"] = _recovery_record(cfg, teacher, history, evals, n_train, acc.num_processes, local, verify,
                                              started)
        record["recovery"]["untied_embeddings"] = _untied(converted, config)
        record["recovery"].update(facts or {})
        record["recovery"]["command"] = command_line(["mla", "finetune", "CONVERTED", "OUT"], cfg, style="keys")
        write_json(tmp / "mla_conversion.json", record)
        write_card(tmp, record)  # README.md: ours, never CONVERTED's copied card
        _plot(evals, tmp / "recovery.png")
    rec = record["recovery"]
    ratio = f"; val perplexity {evals[0]['ratio']:.3f}x -> {evals[-1]['ratio']:.3f}x the teacher's" if evals else ""
    untied = "; lm_head untied from embed_tokens (an adapter trained one of them)" if rec["untied_embeddings"] else ""
    print(f"recovered {converted.name} -> {out}: {rec['tokens_seen']} tokens in {rec['steps']} steps, final KL "
          f"{rec['final_kl']:.4f}{ratio}{untied}; {rec['elapsed_s']:.0f}s")
    return record


def _save_adapter(model, folder: Path, converted: Path, ckpt_dir: Path, adapters: bool) -> None:
    """The adapter in peft format under ``folder/adapter``, its base named when it outlives the run; nothing after
    all-parameter training (no ``adapters``)."""
    if not adapters:
        return
    model.save_pretrained(folder / ADAPTER_DIR)
    adapter_cfg = folder / ADAPTER_DIR / "adapter_config.json"
    meta = json.loads(adapter_cfg.read_text())
    meta["base_model_name_or_path"] = str(converted) if converted.parent != ckpt_dir else None
    write_json(adapter_cfg, meta)


def _save_merged(model, folder: Path, dtype: torch.dtype, adapters: bool):
    """The weights with the adapter merged in (they load without peft), in ``dtype``; returns their config. Frozen
    bfloat16 weights are merged in float32 on the CPU (as exact as a float32 run's merge)."""
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.to("cpu")
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.float()
    merged = model.merge_and_unload() if adapters else model
    state = {k: v.detach().to("cpu", dtype) for k, v in merged.state_dict().items()}
    if merged.config.tie_word_embeddings:
        state.pop(HEAD, None)
    save_state_dict(state, folder)
    config = merged.config
    config.dtype = dtype
    return config


def _write_files(converted: Path, folder: Path, fmt: str, config) -> None:
    """The converted model's other files (tokenizer, generation config), and the config and this package's remote
    code in the output format (CONVERTED's own code may be another release's, or edited)."""
    for item in converted.iterdir():
        if item.is_file() and not item.name.startswith("model.safetensors") and item.name not in WRITTEN:
            shutil.copyfile(item, folder / item.name)
    if fmt == "deepseek_v3":
        write_deepseek_v3(folder, config)
    else:
        config.architectures, config.auto_map = ["MLAForCausalLM"], dict(AUTO_MAP)
        config.save_pretrained(folder)
        copy_remote_code(folder)


def _random_windows(vocab_size: int, cfg: RecoverConfig) -> torch.LongTensor:
    """Two windows of random token ids (fixed by the seed) to check the export on when there is no validation text:
    the check compares two models token by token, which needs no meaningful text."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab_size, (2, min(cfg.seq_len, 128)), generator=generator)


def _untied(converted: Path, config) -> bool:
    """Whether the run gave the output head its own weight (``models.untie_trained_embeddings``)."""
    tied = json.loads((converted / "config.json").read_text()).get("tie_word_embeddings", False)
    return bool(tied) and not config.tie_word_embeddings


def _load_written(folder: Path, fmt: str, device, dtype: torch.dtype) -> torch.nn.Module:
    """The export in ``folder`` as a user loads it, in ``dtype``: with the remote code in the folder
    (``_remote_classes``), or as a stock ``DeepseekV3ForCausalLM``; MLAError naming a weight it lacks or does not
    use."""
    from transformers import AutoModelForCausalLM

    cls, kwargs = AutoModelForCausalLM, {}
    if fmt != "deepseek_v3":
        config_class, cls = _remote_classes(folder)
        kwargs["config"] = config_class.from_pretrained(folder)
    model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True, **kwargs)
    tied = model.config.tie_word_embeddings
    wrong = [k for k in info.get("missing_keys", []) if not (tied and k == HEAD)] + [
        *info.get("unexpected_keys", []), *info.get("mismatched_keys", [])]
    if wrong:
        raise MLAError(f"the merged export does not load as the trained model: {len(wrong)} weights missing, unused "
                       f"or misshapen, e.g. {sorted(map(str, wrong))[0]}")
    return model.to(device).eval()


def _remote_classes(folder: Path) -> tuple[type, type]:
    """The config and model classes of the remote code in ``folder``, imported as ``trust_remote_code`` imports them
    where this package is not installed (here the Auto classes would pick the package's registered classes); the
    copy transformers makes of the code under its modules cache is removed once imported."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.utils import HF_MODULES_CACHE

    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    copies = set()
    try:
        classes = []
        for name in ("AutoConfig", "AutoModelForCausalLM"):
            classes.append(get_class_from_dynamic_module(auto_map[name], folder))
            copies.add(Path(HF_MODULES_CACHE, *classes[-1].__module__.split(".")[:2]))
    finally:
        for path in copies:
            shutil.rmtree(path, ignore_errors=True)
    return classes[0], classes[1]


def _verify(model, folder: Path, fmt: str, windows: torch.LongTensor, trained: torch.Tensor, micro: int, acc,
            dtype: torch.dtype, frozen: torch.dtype) -> dict:
    """The export in ``folder`` loaded in place of ``model`` (``_load_written``, in the dtype of the run's frozen
    weights) and evaluated on ``windows`` as training evaluated (under ``acc``'s autocast): MLAError unless every
    token's NLL is the one the trained model gave (``trained``): within 1e-3 on average; when either is bf16, where
    rounding the trained tensors alone moves a token's NLL by about 0.05, within 0.2 on average and 0.02 in the mean."""
    model.to("meta")  # the trained weights are saved; the export takes their place in memory
    written = _load_written(folder, fmt, acc.device, frozen)
    with acc.autocast():
        nll = token_nll(written, windows, micro, desc="check")
    del written
    diff = nll.double() - trained.double()
    verify = {"val_ppl_reloaded": math.exp(nll.double().mean()), "val_ppl_trained": math.exp(trained.double().mean()),
              "val_nll_mean_abs_diff": float(diff.abs().mean())}
    loose = dtype != torch.float32 or frozen != torch.float32 or acc.mixed_precision == "bf16"
    if not (verify["val_nll_mean_abs_diff"] <= 1e-3 or (loose and verify["val_nll_mean_abs_diff"] <= 0.2
                                                        and abs(float(diff.mean())) <= 0.02)):
        raise MLAError(f"the merged export does not reproduce the trained model (perplexity "
                       f"{verify['val_ppl_reloaded']:.3f} vs {verify['val_ppl_trained']:.3f}; per-token NLL off by "
                       f"{verify['val_nll_mean_abs_diff']:.2e} on average)")
    return verify


def _recovery_record(cfg: RecoverConfig, teacher: str, history: list[dict], evals: list[dict], n_train: int,
                     processes: int, local: dict | None, verify: dict | None, started: float) -> dict:
    """The ``recovery`` entry of the export's mla_conversion.json."""
    steps = history[-1]["step"] if history else 0
    return {
        "teacher": teacher,
        "data": cfg.data,
        "steps": steps,
        "tokens_seen": steps * cfg.batch_size * cfg.seq_len,
        "settings": asdict(cfg),
        "trainable_parameters": n_train,
        "processes": processes,
        "final_loss": _final_loss(history, "loss"),
        "final_kl": _final_loss(history, "kl"),
        "final_ce": _final_loss(history, "ce"),
        "val": evals,
        "local": _local_record(local, evals),
        "verify": verify,
        "adapter": ADAPTER_DIR if cfg.adapters else None,  # none: all-parameter training
        "elapsed_s": round(time.time() - started, 1),
        "history": history,
    }


def _local_record(local: dict | None, evals: list[dict]) -> dict | None:
    """The layer-local stage's record, with the validation ratio before it (after it: ``val[0]``)."""
    if local is None:
        return None
    local = dict(local)
    nll = local.pop("val_nll_before", None)
    if nll is not None and evals:
        local["val_ratio_before"] = math.exp(nll) / evals[0]["teacher_val_ppl"]
    return local


def _plot(evals: list[dict], path: Path) -> None:
    """recovery.png: validation perplexity ratio vs training tokens (skipped without matplotlib)."""
    if len(evals) < 2:
        return
    try:
        import matplotlib  # optional: the plot is skipped without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["tokens"] for e in evals], [e["ratio"] for e in evals], marker="o")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val perplexity / teacher's")
    ax.set_title("Recovery by distillation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
