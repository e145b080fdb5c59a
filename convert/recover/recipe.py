"""The recovery run of ``mla finetune``: load the student and the teacher, the layer-local stage, distillation with
validation and checkpoints, the export."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import MLAError
from ..save import save_checkpoint
from ..sources import check_positions, load_config, load_tokenizer, resolve_source
from .checkpoint import (CKPT_NAME, _fingerprint, _read_checkpoint, _settings, _StopFlag, _trainable_state, run_inputs,
                         work_dir)
from .config import RecoverConfig
from .export import _export
from .local import LOCAL_CKPT, local_stage
from .losses import _nll, distill_loss, lr_at
from .models import _load_student, _param_bytes, check_teacher, load_teacher, wrap_peft
from .windows import _val_windows, _windows, batch_rows


def _finetune(converted: Path, out: Path, record: dict, teacher: str, cfg: RecoverConfig, overwrite: bool,
              restart: bool, ckpt_dir: Path | None, log) -> dict:
    from accelerate import Accelerator  # accelerate: heavy, only for training

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

    local_record = local_stage(student, teacher_source, teacher_config, windows, val, cfg, acc.device, ckpt_dir,
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
        for path in (ckpt_path, ckpt_dir / LOCAL_CKPT):
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a save cut short by a kill
        with contextlib.suppress(OSError):
            ckpt_dir.rmdir()
    return result


def _nonfinite(what: str, value: float, step: int, cfg: RecoverConfig, ckpt_path: Path) -> str:
    kept = f"the last checkpoint ({ckpt_path}) is kept" if ckpt_path.exists() else "no checkpoint was written"
    return (f"{what} became {value} at step {step + 1}; stopped ({kept}). Lower lr (now {cfg.lr:g}) or check the "
            "converted weights and the training text")
