"""The recovery run of ``mla finetune`` (being split into the modules of this package)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import split_list
from ..data import load_sources, load_texts, mixed_windows, read_budget, source_paths, split_sources, token_windows
from ..deepseek import check_deepseek_v3, is_deepseek_v3, load_mla, write_deepseek_v3
from ..device import resolve_device
from ..errors import MLAError, quote
from ..nll import perplexity
from ..files import atomic_dir, check_out, out_lock
from ..save import AUTO_MAP, copy_remote_code, save_checkpoint, save_state_dict, write_json
from ..sources import check_positions, input_paths, load_config, load_tokenizer, resolve_source
from .config import FULL_DEFAULT_TARGETS, RecoverConfig

CKPT_NAME = "checkpoint.pt"
# Keys that do not change the trained weights or the log; a resumed run may change them.
NOT_FINGERPRINTED = ("checkpoint_every", "device")
ADAPTER_DIR = "adapter"


def work_dir(out: Path) -> Path:
    """Checkpoints (and, for ``mla convert --recipe``, the training-free conversion) live beside OUT until it is done."""
    return out.parent / f"{out.name}.ckpt"


def lr_at(step: int, cfg: RecoverConfig, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    factor = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * factor)


_PERMUTATION: dict = {}  # the current epoch's order, (n, seed, epoch) -> permutation


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> torch.LongTensor:
    """Rows of the training windows used at ``step``: a fresh seeded permutation per epoch (a pure function of step)."""
    rows = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(j, n)
        key = (n, seed, epoch)
        if key not in _PERMUTATION:
            _PERMUTATION.clear()
            _PERMUTATION[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(_PERMUTATION[key][i]))
    return torch.tensor(rows, dtype=torch.long)


def distill_loss(student_out, teacher_out, input_ids, cfg: RecoverConfig):
    """(loss, kl, ce, hidden) averaged over tokens; KL at every position, cross-entropy on next tokens."""
    s = student_out.logits.float().flatten(0, 1)  # (B*T, V)
    zero = torch.zeros((), device=s.device)
    kl = ce = hidden = zero
    if cfg.kd_weight:
        t = teacher_out.logits.float().flatten(0, 1)
        temp = cfg.temperature
        kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                      reduction="batchmean") * temp**2
    if cfg.ce_weight:
        logits = student_out.logits[:, :-1].float().flatten(0, 1)
        ce = F.cross_entropy(logits, input_ids[:, 1:].flatten())
    if cfg.hidden_weight:
        if len(student_out.hidden_states) != len(teacher_out.hidden_states):
            raise MLAError("hidden_weight needs a teacher with as many layers as the student")
        pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True))  # layer outputs
        hidden = sum(((hs.float() - ht.float()).pow(2).sum(-1) / ht.float().pow(2).sum(-1).clamp_min(1e-6)).mean()
                     for hs, ht in pairs) / len(pairs)
    loss = cfg.kd_weight * kl + cfg.ce_weight * ce + cfg.hidden_weight * hidden
    return loss, kl.detach(), ce.detach(), hidden.detach()


SAMPLES, SAMPLE_BYTES = 64, 4096  # a weight file's digest: its size, header and 64 samples of 4 KiB spread over it


def _file_digest(path: Path, h) -> None:
    """Feed ``h`` a file's name, size and ``SAMPLES`` chunks spread over it: any other checkpoint, even of the same
    architecture, differs in them, and an 8B teacher costs 256 KiB of reading, not 16 GB."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for k in range(SAMPLES):
            f.seek(size * k // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))


def _source_digest(source) -> str:
    """What identifies the teacher: its config and weight files (sampled), or its Hub id when it is not local."""
    h = hashlib.sha256()
    local = source.local
    if local is None:
        h.update(source.path.encode())
    elif local.is_file():  # a .gguf
        _file_digest(local, h)
    else:
        for path in sorted(local.iterdir()):
            if path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
                _file_digest(path, h)
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor | None) -> str:
    return hashlib.sha256(b"" if t is None else t.contiguous().numpy().tobytes()).hexdigest()


def run_inputs(converted: Path, teacher_source, windows: torch.LongTensor, val) -> dict[str, str]:
    """Digests of what a run reads besides its settings, by the name an error gives them: the converted model, the
    teacher, and the training and validation text (their token windows: the text's content and its tokenization)."""
    return {
        "the converted model": hashlib.sha256((converted / "mla_conversion.json").read_bytes()).hexdigest(),
        "the teacher": _source_digest(teacher_source),
        "the training text": _tensor_digest(windows),
        "the validation text": _tensor_digest(val),
    }


def _fingerprint(cfg: RecoverConfig, inputs: dict[str, str]) -> str:
    blob = json.dumps({"cfg": _settings(cfg), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _settings(cfg: RecoverConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}


def _changed(state: dict, cfg: RecoverConfig, inputs: dict[str, str]) -> list[str]:
    """The settings keys and the inputs in which ``state`` (a checkpoint) differs from this run."""
    old, new = state.get("settings", {}), _settings(cfg)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    old_inputs = state.get("inputs", {})
    return keys + [name for name, digest in inputs.items() if old_inputs.get(name) != digest]


def _read_checkpoint(path: Path, fingerprint: str, cfg: RecoverConfig, inputs: dict[str, str],
                     restart: bool) -> dict | None:
    """A checkpoint of this run (its ``fingerprint``) to resume from, None to start afresh; MLAError naming the changed
    settings and inputs when it is from another run."""
    if restart or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MLAError(f"checkpoint {path} is unreadable ({str(err).splitlines()[0][:200]}); "
                       "re-run with --restart to start over") from None
    if not isinstance(state, dict):
        raise MLAError(f"checkpoint {path} is not a checkpoint of mla finetune; re-run with --restart to start over")
    if state.get("fingerprint") != fingerprint:
        changed = _changed(state, cfg, inputs) or ["the converted model or the teacher"]
        raise MLAError(f"checkpoint {path} is from a different run (changed: {', '.join(changed)}); "
                       "re-run with --restart to discard it")
    return state


def _read_record(converted: Path) -> dict:
    path = converted / "mla_conversion.json"
    if not converted.is_dir():
        raise MLAError(f"converted model not found: {converted}")
    if not path.exists():
        raise MLAError(f"{converted} is not an MLA export (no mla_conversion.json); convert it with mla convert first")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MLAError(f"could not read {path}: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("source", {}), dict):
        raise MLAError(f"{path} is malformed: expected a JSON object whose 'source' is an object (as mla convert "
                       "writes it)")
    return record


def check_teacher(teacher: str, config, student_config, record: dict) -> None:
    """MLAError unless the teacher has the architecture the export was converted from: the shape recorded in
    ``mla_conversion.json`` (family, layers, heads, head width) and the student's vocabulary and hidden size. An edited
    ``source`` (or ``teacher=``) naming another model would otherwise teach the student a model it never was."""
    from ..adapters import read_layout

    layout = read_layout(config)
    found = {"model_type": layout.model_type, "num_layers": layout.num_layers, "num_attention_heads": layout.num_heads,
             "num_key_value_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
             "hidden_size": layout.hidden_size, "vocab_size": config.get_text_config().vocab_size}
    expected = {k: v for k, v in record.get("source", {}).items() if k in found}
    expected.update(hidden_size=student_config.hidden_size, vocab_size=student_config.vocab_size)
    differ = [f"{k} {found[k]} (the export's source: {quote(v)})" for k, v in expected.items() if found[k] != v]
    if differ:
        raise MLAError(f"teacher {teacher} is not the model {record.get('source', {}).get('spec', 'CONVERTED')!s:.80} "
                       f"was converted from: {'; '.join(differ)}")


def _load_student(converted: Path):
    try:
        return load_mla(converted)
    except MLAError:
        raise
    except Exception as err:  # corrupt weights surface as many types
        first = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
        raise MLAError(f"could not load the converted model {converted}: {first}") from None


def output_format(converted: Path, cfg: RecoverConfig) -> str:
    """The format ``mla finetune`` writes (``cfg.format``, else the converted model's own); MLAError, before any
    training, when the converted model cannot be written as deepseek_v3."""
    own = "deepseek_v3" if is_deepseek_v3(converted) else "mla"
    fmt = cfg.format or own
    if fmt == "deepseek_v3" and own == "mla":
        from mla_modeling.configuration_mla import MLAConfig

        try:
            check_deepseek_v3(MLAConfig.from_pretrained(converted))
        except MLAError as err:
            raise MLAError(f"format deepseek_v3: {converted} cannot be written as deepseek_v3: {err}") from None
    return fmt


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_teacher(source, config, student, device) -> tuple[torch.nn.Module, int]:
    """The teacher, sharing every frozen student tensor that holds exactly its own values (embeddings, MLP base
    weights, output head; norms too unless they are trained): only the original attention projections (and trained
    norms) are extra memory. Returns (teacher in eval mode, frozen on ``device``; bytes shared)."""
    from ..adapters import text_config
    from ..readers import open_reader, skeleton
    from ..weights import check_weights

    check_weights(source, config)
    config = text_config(config)  # a multimodal checkpoint teaches with its text model
    frozen = {}
    for name, p in student.named_parameters():
        if p.requires_grad or "lora_" in name or ".modules_to_save." in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        frozen[key] = p
    model = skeleton(config)
    names = [n for n in model.state_dict() if n != "lm_head.weight" or not config.tie_word_embeddings]
    reader = open_reader(source, config)  # a GGUF, .bin or Hub id is loaded whole: its shared copies are then freed
    state, shared = {}, 0
    for name in names:
        t = reader.get([name])[name].to(device, torch.float32)
        own = frozen.get(name)
        if own is not None and own.shape == t.shape and own.dtype == t.dtype and torch.equal(own.detach(), t):
            t = own.detach()  # the same storage as the student's
            shared += t.numel() * t.element_size()
        state[name] = t
    del reader
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or [k for k in result.missing_keys if k != "lm_head.weight"]:
        raise MLAError(f"internal error: the teacher's weights do not fit its architecture ({result})")
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for mod_name, module in model.named_modules():  # other non-persistent buffers: Gemma's embedding scale
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and hasattr(module, f"scalar_{buf_name}"):
                setattr(module, buf_name, torch.tensor(getattr(module, f"scalar_{buf_name}"), device=device))
            elif buf.is_meta:
                raise MLAError(f"internal error: the teacher's buffer {mod_name}.{buf_name} was never set")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.requires_grad_(False)
    return model.eval(), shared


def _module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def wrap_peft(model, cfg: RecoverConfig):
    """The student with LoRA on ``lora_targets`` and trainable copies of ``full_targets``; the rest frozen."""
    from peft import LoraConfig, get_peft_model

    lora, full = split_list(cfg.lora_targets), split_list(cfg.full_targets)
    names = _module_names(model)
    if cfg.full_targets == FULL_DEFAULT_TARGETS:  # the default names what any family may have: keep what exists
        full = [n for n in full if n in names]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in lora:
        if name not in linear:
            raise MLAError(f"lora_targets: no linear module named {name!r} (have: {', '.join(sorted(linear))})")
    for name in full:
        if name not in names:
            raise MLAError(f"full_targets: no module named {name!r}")
    if not lora:  # peft needs at least one LoRA target; a rank-r adapter on nothing would be meaningless
        raise MLAError("lora_targets is empty: give at least one module for LoRA (full_targets alone: use a "
                       "full fine-tune tool)")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=lora,
                        modules_to_save=full or None, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, config)


def _windows(tokenizer, cfg: RecoverConfig) -> torch.LongTensor:
    return mixed_windows(tokenizer, load_sources(cfg.data, read_budget(cfg.tokens)), cfg.seq_len, None, seed=cfg.seed)


def _val_windows(tokenizer, cfg: RecoverConfig) -> torch.LongTensor | None:
    if not cfg.val_data or not cfg.val_tokens:
        return None
    return token_windows(tokenizer, load_texts(cfg.val_data, read_budget(cfg.val_tokens)), cfg.seq_len, cfg.val_tokens // cfg.seq_len, seed=0)


def _nll(model, windows: torch.LongTensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood over the windows (the measure eval.perplexity reports)."""
    return math.log(perplexity(model, windows, batch_size, desc="val"))


class _StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop at the end of the step; a second one interrupts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.set = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _is_main_launch_process() -> bool:
    """False in the non-zero ranks of torchrun / accelerate launch (only rank 0 locks and writes OUT)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def data_inputs(cfg: RecoverConfig) -> list[Path]:
    """Local paths among the training and validation text sources (what no output may replace)."""
    return source_paths(cfg.data, cfg.val_data)


def finetune(converted: str | Path, out: str | Path, cfg: RecoverConfig, overwrite: bool = False, restart: bool = False,
             ckpt_dir: Path | None = None, teacher: str | None = None, log=print, inputs=()) -> dict:
    """Recover CONVERTED by distillation into OUT (atomic); resumable from ``ckpt_dir`` (default OUT.ckpt).

    ``inputs``: more local paths the command reads (a recipe) that OUT must not replace.
    """
    cfg.validate()
    converted = Path(converted).expanduser().resolve()
    record = _read_record(converted)
    recorded = record.get("source", {})
    teacher = cfg.teacher or teacher or recorded.get("resolved") or recorded.get("spec")
    if teacher and not isinstance(teacher, str):
        raise MLAError(f"{converted}/mla_conversion.json is malformed: its source names {quote(teacher)}, not a "
                       "model; set teacher=...")
    if not teacher:
        raise MLAError(f"no teacher: {converted}/mla_conversion.json names no source; set teacher=...")
    output_format(converted, cfg)
    readers = [converted, *input_paths(teacher), *data_inputs(cfg), *inputs]
    out = check_out(out, overwrite, readers)
    if ckpt_dir is None:
        check_out(work_dir(out), True, readers, what="the checkpoint folder")
    lock = out_lock(out) if _is_main_launch_process() else contextlib.nullcontext()
    with lock:
        try:
            return _finetune(converted, out, record, teacher, cfg, overwrite, restart, ckpt_dir, log)
        except BaseException:  # checkpoints stay for the next run to resume from; an empty folder does not
            with contextlib.suppress(OSError):
                (ckpt_dir or work_dir(out)).rmdir()
            raise


def _finetune(converted: Path, out: Path, record: dict, teacher: str, cfg: RecoverConfig, overwrite: bool,
              restart: bool, ckpt_dir: Path | None, log) -> dict:
    from accelerate import Accelerator

    started = time.time()
    ckpt_dir = ckpt_dir or work_dir(out)
    ckpt_path = ckpt_dir / CKPT_NAME

    cuda = resolve_device(cfg.device, "device=").type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    main = acc.is_main_process
    # tqdm.write keeps messages off the progress bar's line
    say = (tqdm.write if log is print else log) if main else (lambda *_: None)
    if cfg.batch_size % acc.num_processes:
        raise MLAError(f"batch_size {cfg.batch_size} is not divisible by the {acc.num_processes} processes")
    local_batch = cfg.batch_size // acc.num_processes
    micro = min(cfg.micro_batch or local_batch, local_batch)

    # load: student, teacher, text; then the checkpoint of this run, if any
    student = _load_student(converted)
    say(f"teacher: {teacher}")
    teacher_source = resolve_source(teacher)
    teacher_config = load_config(teacher_source)
    check_teacher(teacher, teacher_config, student.config, record)
    check_positions(teacher_config, cfg.seq_len, "seq_len", teacher)
    tokenizer = load_tokenizer(teacher_source)
    windows = _windows(tokenizer, cfg)
    val = _val_windows(tokenizer, cfg)
    inputs = run_inputs(converted, teacher_source, windows, val)
    fingerprint = _fingerprint(cfg, inputs)
    resume = _read_checkpoint(ckpt_path, fingerprint, cfg, inputs, restart)
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len))
    say(f"training text: {cfg.data} ({len(windows)} windows of {cfg.seq_len}); {total_steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens{'' if acc.num_processes == 1 else f' on {acc.num_processes} processes'}")

    local_record = _local_stage(student, teacher_source, teacher_config, windows, val, cfg, acc.device, ckpt_dir,
                                (fingerprint, inputs), restart, main, say) if cfg.local_tokens else None
    if cfg.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_peft(student, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    start_step, history, evals, teacher_nll = 0, [], [], None
    if resume is not None:
        missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(resume["trainable"])
        if missing:
            raise MLAError(f"checkpoint {ckpt_path} lacks {len(missing)} trained tensors; re-run with --restart")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in resume["trainable"]:
                    p.copy_(resume["trainable"][name])
        optimizer.load_state_dict(resume["optimizer"])
        start_step, history, evals = resume["step"], resume["history"], resume["evals"]
        teacher_nll = resume.get("teacher_nll")
        torch.set_rng_state(resume["rng"])
        say(f"resuming from {ckpt_path} at step {start_step}/{total_steps}")
    else:
        torch.manual_seed(cfg.seed)
    model, optimizer = acc.prepare(model, optimizer)
    inner = acc.unwrap_model(model)
    teacher_model, shared = load_teacher(teacher_source, teacher_config, inner, acc.device)
    say(f"teacher shares {shared / 2**20:.0f} MiB of frozen weights with the student (embeddings, MLP, head); "
        f"its own {(_param_bytes(teacher_model) - shared) / 2**20:.0f} MiB (attention, trained norms)")

    def evaluate(step: int) -> None:
        nonlocal teacher_nll
        if val is None:
            return
        if teacher_nll is None:
            teacher_nll = _nll(teacher_model, val, micro)
        inner.eval()
        nll = _nll(inner, val, micro)
        inner.train()
        evals.append({"step": step, "tokens": step * cfg.batch_size * cfg.seq_len, "val_ppl": math.exp(nll),
                      "teacher_val_ppl": math.exp(teacher_nll), "ratio": math.exp(nll - teacher_nll)})
        say(f"step {step}: val perplexity {math.exp(nll):.2f} ({math.exp(nll - teacher_nll):.3f}x the teacher's)")

    def checkpoint(step: int) -> None:
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt_path, {
                "fingerprint": fingerprint, "settings": _settings(cfg), "inputs": inputs,
                "step": step, "trainable": _trainable_state(inner), "optimizer": optimizer.state_dict(),
                "history": history, "evals": evals, "teacher_nll": teacher_nll, "rng": torch.get_rng_state()})
        acc.wait_for_everyone()

    if start_step == 0 and not evals:
        evaluate(0)
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start_step, total_steps), desc="recover", unit="step", initial=start_step, total=total_steps,
               disable=not main)
    t_run, steps_run = time.time(), 0
    with _StopFlag() as stop:
        for step in bar:
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = batch_rows(step, cfg.batch_size, len(windows), cfg.seed)
            local = rows[acc.process_index * local_batch:(acc.process_index + 1) * local_batch]
            optimizer.zero_grad(set_to_none=True)
            kl_sum = ce_sum = loss_sum = hid_sum = 0.0
            for part in local.split(micro):
                ids = windows[part].to(acc.device)
                hidden_states = cfg.hidden_weight > 0
                with torch.no_grad(), acc.autocast():
                    t_out = teacher_model(input_ids=ids, use_cache=False, output_hidden_states=hidden_states)
                with acc.autocast():
                    s_out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden_states)
                loss, kl, ce, hid = distill_loss(s_out, t_out, ids, cfg)
                weight = len(part) / len(local)
                acc.backward(loss * weight)
                loss_sum += float(loss.detach()) * weight
                kl_sum += float(kl) * weight
                ce_sum += float(ce) * weight
                hid_sum += float(hid) * weight
                del t_out, s_out, loss
            if acc.num_processes > 1:  # log the global batch's losses, and stop on every process together
                sums = acc.reduce(torch.tensor([loss_sum, kl_sum, ce_sum, hid_sum], device=acc.device),
                                  reduction="mean")
                loss_sum, kl_sum, ce_sum, hid_sum = (float(v) for v in sums)
            if not math.isfinite(loss_sum):
                raise MLAError(_nonfinite("loss", loss_sum, step, cfg, ckpt_path))
            grad_norm = float(acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else
                              torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            if not math.isfinite(grad_norm):
                raise MLAError(_nonfinite("gradient norm", grad_norm, step, cfg, ckpt_path))
            optimizer.step()
            steps_run += 1
            history.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_sum, "kl": kl_sum,
                            "ce": ce_sum, "hidden": hid_sum, "lr": lr, "grad_norm": grad_norm})
            rate = steps_run * tokens_per_step / (time.time() - t_run)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            done = step + 1
            if done % cfg.eval_every == 0 and done < total_steps:
                evaluate(done)
            if done % cfg.checkpoint_every == 0 or stop.set:
                checkpoint(done)
            if stop.set and done < total_steps:
                bar.close()
                say(f"interrupted: checkpoint at step {done}/{total_steps} in {ckpt_dir}; re-run the same command "
                    "to resume")
                raise KeyboardInterrupt
    bar.close()
    if not evals or evals[-1]["step"] != total_steps:
        evaluate(total_steps)
        checkpoint(total_steps)

    result = None
    optimizer.zero_grad(set_to_none=True)
    del optimizer, teacher_model  # the export needs neither: free their memory first
    if main:
        result = _export(inner, converted, out, record, cfg, teacher, history, evals, n_train, overwrite, val, micro,
                         acc, started, ckpt_dir, local_record)
    acc.wait_for_everyone()
    if main:
        from .local import LOCAL_CKPT

        for path in (ckpt_path, ckpt_dir / LOCAL_CKPT):
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a save cut short by a kill
        with contextlib.suppress(OSError):
            ckpt_dir.rmdir()
    return result


def _local_stage(student, source, config, windows, val, cfg: RecoverConfig, device, ckpt_dir: Path, run_id: tuple,
                 restart: bool, main: bool, say) -> dict:
    """The layer-local stage (``convert.local``) on ``student`` in place; resumes from ``OUT.ckpt/local.pt`` when
    ``run_id`` (fingerprint, inputs) is that checkpoint's."""
    from ..adapters import read_layout, text_config
    from ..layerwise import LayerwiseModel
    from ..readers import open_reader
    from .local import LOCAL_CKPT, local_windows, run_local

    path = ckpt_dir / LOCAL_CKPT
    fingerprint, inputs = run_id
    resume = _read_checkpoint(path, fingerprint, cfg, inputs, restart)
    student.requires_grad_(False)
    student.to(device)
    extra = {"settings": _settings(cfg), "inputs": inputs}
    if resume is None and val is not None:  # the starting point, for the record
        extra["val_nll_before"] = _nll(student, val, cfg.micro_batch or cfg.batch_size)
    ids = local_windows(windows, cfg)
    if resume is not None:
        say(f"layer-local stage: resuming from {path} after layer {resume['done']}")
    layout = read_layout(config)
    text = text_config(config)
    lw = LayerwiseModel(text, open_reader(source, text), device, torch.float32, layout.layer_types, layout.decoder)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = run_local(student, lw, ids, cfg, path, fingerprint, resume, main, say, extra=extra)
    del lw
    return {k: v for k, v in state.items() if k not in ("tensors", "fingerprint", "settings", "inputs")} | {"windows": len(ids)}


def _nonfinite(what: str, value: float, step: int, cfg: RecoverConfig, ckpt_path: Path) -> str:
    kept = f"the last checkpoint ({ckpt_path}) is kept" if ckpt_path.exists() else "no checkpoint was written"
    return (f"{what} became {value} at step {step + 1}; stopped ({kept}). Lower lr (now {cfg.lr:g}) or check the "
            "converted weights and the training text")


def _final_loss(history: list[dict], key: str, last: int = 10) -> float | None:
    tail = [h[key] for h in history[-last:]]
    return sum(tail) / len(tail) if tail else None


def _export(model, converted: Path, out: Path, record: dict, cfg: RecoverConfig, teacher: str, history, evals,
            n_train: int, overwrite: bool, val, micro: int, acc, started: float, ckpt_dir: Path,
            local: dict | None = None) -> dict:
    fmt = output_format(converted, cfg)
    model.eval()
    dtype = getattr(torch, str(record.get("method", {}).get("dtype", "float32")), torch.float32)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp / ADAPTER_DIR)
        adapter_cfg = tmp / ADAPTER_DIR / "adapter_config.json"
        meta = json.loads(adapter_cfg.read_text())
        meta["base_model_name_or_path"] = str(converted) if converted.parent != ckpt_dir else None
        write_json(adapter_cfg, meta)
        merged = model.merge_and_unload()
        state = {k: v.detach().to("cpu", dtype) for k, v in merged.state_dict().items()}
        if merged.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_state_dict(state, tmp)
        config = merged.config
        config.dtype = dtype
        del state, merged
        for item in converted.iterdir():
            if item.is_file() and not item.name.startswith("model.safetensors") and item.name != "mla_conversion.json":
                shutil.copyfile(item, tmp / item.name)
        if fmt == "deepseek_v3":
            write_deepseek_v3(tmp, config)
        elif is_deepseek_v3(converted):  # read from deepseek_v3, written as our own format
            config.architectures, config.auto_map = ["MLAForCausalLM"], dict(AUTO_MAP)
            config.save_pretrained(tmp)
            copy_remote_code(tmp)
        final = evals[-1] if evals else None
        verify = None
        if val is not None:
            model.to("meta")  # the trained weights are saved; the reloaded export takes their place in memory
            reloaded = load_mla(tmp).to(acc.device)
            nll = _nll(reloaded, val, micro)
            del reloaded
            verify = {"val_ppl_reloaded": math.exp(nll), "val_ppl_trained": final["val_ppl"]}
            if abs(nll - math.log(final["val_ppl"])) > 1e-3 + (0.02 if dtype != torch.float32 else 0):
                raise MLAError(f"the merged export does not reproduce the trained model (val perplexity "
                               f"{math.exp(nll):.3f} vs {final['val_ppl']:.3f})")
        steps = history[-1]["step"] if history else 0
        record = dict(record)
        record["format"] = fmt
        record["recovery"] = {
            "teacher": teacher,
            "data": cfg.data,
            "steps": steps,
            "tokens_seen": steps * cfg.batch_size * cfg.seq_len,
            "settings": asdict(cfg),
            "trainable_parameters": n_train,
            "processes": acc.num_processes,
            "final_loss": _final_loss(history, "loss"),
            "final_kl": _final_loss(history, "kl"),
            "final_ce": _final_loss(history, "ce"),
            "val": evals,
            "local": _local_record(local, evals),
            "verify": verify,
            "adapter": ADAPTER_DIR,
            "elapsed_s": round(time.time() - started, 1),
            "history": history,
        }
        write_json(tmp / "mla_conversion.json", record)
        _plot(evals, tmp / "recovery.png")
    rec = record["recovery"]
    ratio = f"; val perplexity {evals[0]['ratio']:.3f}x -> {evals[-1]['ratio']:.3f}x the teacher's" if evals else ""
    print(f"recovered {converted.name} -> {out}: {rec['tokens_seen']} tokens in {rec['steps']} steps, final KL "
          f"{rec['final_kl']:.4f}{ratio}; {rec['elapsed_s']:.0f}s")
    return record


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
        import matplotlib

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


def convert_and_recover(src: str, out: str | Path, ccfg, rcfg: RecoverConfig, restart: bool = False, log=print,
                        inputs=()) -> dict:
    """``mla convert SRC OUT --recipe FILE`` with a ``recover:`` section: convert, recover, export in one go.

    The training-free conversion is kept in ``OUT.ckpt/converted`` (with the training checkpoints) until OUT is
    written, so re-running the same command after a kill resumes instead of converting again.
    """
    rcfg.validate()
    ccfg.validate()
    readers = [*input_paths(src), *source_paths(ccfg.calib), *data_inputs(rcfg), *inputs]
    out = check_out(out, ccfg.overwrite, readers)
    check_out(work_dir(out), True, readers, what="the checkpoint folder")
    with out_lock(out):
        return _convert_and_recover(src, out, ccfg, rcfg, restart, log)


def _convert_and_recover(src: str, out: Path, ccfg, rcfg: RecoverConfig, restart: bool, log) -> dict:
    from ..pipeline import convert

    work = work_dir(out)
    converted = work / "converted"
    settings_path = work / "convert_settings.json"
    settings = {"src": src, **asdict(replace(ccfg, overwrite=False))}
    if restart and work.exists():
        shutil.rmtree(work)
    if (converted / "mla_conversion.json").exists():
        old = json.loads(settings_path.read_text()) if settings_path.exists() else {}
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise MLAError(f"{work} holds a conversion with other settings (changed: {', '.join(changed)}); "
                           "re-run with --restart to discard it")
        log(f"reusing the conversion in {converted}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        convert(src, converted, replace(ccfg, overwrite=True), log=log)
        write_json(settings_path, settings)
    record = finetune(converted, out, rcfg, overwrite=ccfg.overwrite, ckpt_dir=work, teacher=src, log=log)
    shutil.rmtree(work, ignore_errors=True)
    return record
