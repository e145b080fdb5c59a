"""The recovery run of ``mla finetune`` as a recipe: one ``Recovery`` whose named phases ``run`` calls in order.

    setup -> load_models -> load_data -> local_stage -> wrap_student -> resume -> prepare -> train -> export

``train`` calls ``train_step`` per optimizer step, ``evaluate(step)`` every ``eval_every`` steps and at both ends, and
``checkpoint(step)`` every ``checkpoint_every`` steps and on Ctrl-C. What a phase makes (the models, the windows, the
optimizer, the logs) stays on the instance for the next.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import peak_memory, reset_peak_memory, resolve_device
from ..config import fit_to_model
from ..errors import MLAError
from ..sources import check_positions, load_config, load_tokenizer, resolve_source
from .checkpoint import (CKPT_NAME, StopFlag, read_checkpoint, run_fingerprint, run_inputs, trainable_state, work_dir,
                         write_checkpoint)
from .config import RecoverConfig
from .export import write_recovered
from .local import LOCAL_CKPT, run_stage
from .memory import activations, check_batch, describe, estimate, local_processes
from . import shard
from .losses import distill_loss, lr_at, val_nll
from .models import cast_frozen, cast_untrained, check_teacher, load_student, load_teacher, param_bytes, wrap_peft
from .teacher_cache import TeacherCache, check_fits
from .windows import batch_rows, training_windows, validation_windows


class Recovery:
    """Recover the converted model ``converted`` (its ``record``: its mla_conversion.json) into ``out`` by
    distillation from ``teacher``; checkpoints in ``ckpt_dir`` (default OUT.ckpt)."""

    def __init__(self, converted: Path, out: Path, record: dict, teacher: str, cfg: RecoverConfig, overwrite: bool,
                 restart: bool, ckpt_dir: Path | None, log):
        self.started = time.time()
        self.converted, self.out, self.record, self.teacher, self.cfg = converted, out, record, teacher, cfg
        self.overwrite, self.restart, self.log = overwrite, restart, log
        self.ckpt_dir = ckpt_dir or work_dir(out)
        self.ckpt_path = self.ckpt_dir / CKPT_NAME
        self.local_record = None  # the layer-local stage's, when it runs
        self.cache = TeacherCache(cfg.teacher_topk, cfg.temperature) if cfg.teacher_topk else None
        self.start_step, self.history, self.evals, self.teacher_nll = 0, [], [], None

    def run(self) -> dict | None:
        """Every phase in order; the export's record (None in the processes other than the main one)."""
        self.setup()
        self.load_models()
        self.load_data()
        if self.cfg.local_tokens:
            self.local_stage()
        self.wrap_student()
        self.resume()
        self.prepare()
        self.train()
        return self.export()

    def setup(self) -> None:
        """The accelerator (CPU or CUDA, bf16 autocast or not), this process's share of a batch, the logger."""
        from accelerate import Accelerator  # accelerate: heavy, only for training
        from accelerate.state import AcceleratorState

        cfg = self.cfg
        _check_launch()
        cuda = resolve_device(cfg.device, "device=").type == "cuda"
        self.bf16 = bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        if cfg.frozen_dtype == "bfloat16" and not bf16:
            raise MLAError("frozen_dtype=bfloat16 needs bf16 precision: set precision=bf16 (auto is fp32 on the CPU)")
        self.frozen_dtype = torch.bfloat16 if cfg.frozen_dtype == "bfloat16" or (
            cfg.frozen_dtype == "auto" and bf16) else torch.float32
        if AcceleratorState._shared_state:  # an earlier run in this process (a library user's second call)
            AcceleratorState._reset_state()  # fixed its precision; the launch's process group (PartialState) stays
        self.acc = acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
        self.main = acc.is_main_process
        # tqdm.write keeps messages off the progress bar's line
        self.say = (tqdm.write if self.log is print else self.log) if self.main else (lambda *_: None)
        if cfg.batch_size % acc.num_processes:
            raise MLAError(f"batch_size {cfg.batch_size} is not divisible by the {acc.num_processes} processes")
        if cfg.shard and acc.num_processes < 2:
            raise MLAError("shard=true on one process shards nothing: launch several (accelerate launch "
                           "--num_processes N, or torchrun --nproc_per_node N), or drop it")
        self.local_batch = cfg.batch_size // acc.num_processes
        self.micro = min(cfg.micro_batch or self.local_batch, self.local_batch)

    def load_models(self) -> None:
        """The student (the converted model) and the teacher's source and config, checked against the export."""
        self.student = load_student(self.converted)
        cast_frozen(self.student, self.cfg, self.frozen_dtype)  # the trained modules stay float32
        self.say(f"teacher: {self.teacher}")
        self.teacher_source = resolve_source(self.teacher)
        self.teacher_config = load_config(self.teacher_source)
        check_teacher(self.teacher, self.teacher_config, self.student.config, self.record)
        self.cfg = fit_to_model(self.cfg, self.teacher_config, "seq_len")  # a default length fits the model
        check_positions(self.teacher_config, self.cfg.seq_len, "seq_len", self.teacher)
        cfg = self.cfg  # a batch whose activations alone cannot fit: refused before the text is read
        check_batch({"activations": activations(self.student.config, cfg.seq_len, self.micro,
                                                cfg.gradient_checkpointing, self.bf16)},
                    self.acc.device, (), cfg, self.micro)

    def load_data(self) -> None:
        """The training and validation windows, what identifies the run, and its checkpoint (if any) to resume."""
        cfg, acc = self.cfg, self.acc
        tokenizer = load_tokenizer(self.teacher_source)
        self.windows = training_windows(tokenizer, cfg)  # (N, seq_len) token ids
        self.val = validation_windows(tokenizer, cfg)  # (val_tokens // seq_len, seq_len) or None
        self.inputs = run_inputs(self.converted, self.teacher_source, self.windows, self.val)
        self.fingerprint = run_fingerprint(cfg, self.inputs)
        self.saved = read_checkpoint(self.ckpt_path, self.fingerprint, cfg, self.inputs, self.restart)
        self.total_steps = math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len))
        if cfg.teacher_topk:  # every window a process passes over may be kept, by each process of the host
            check_fits(cfg.teacher_topk, self.student.config.vocab_size,
                       min(len(self.windows), self.total_steps * self.local_batch), cfg.seq_len,
                       processes=local_processes())
        self.say(f"training text: {cfg.data} ({len(self.windows)} windows of {cfg.seq_len}); {self.total_steps} steps "
                 f"of {cfg.batch_size} x {cfg.seq_len} tokens"
                 f"{'' if acc.num_processes == 1 else f' on {acc.num_processes} processes'}")

    def local_stage(self) -> None:
        """The layer-local stage (``local.py``) on the student, in place."""
        self.local_record = run_stage(self.student, self.teacher_source, self.teacher_config, self.windows, self.val,
                                      self.cfg, self.acc.device, self.ckpt_dir, (self.fingerprint, self.inputs),
                                      self.restart, self.main, self.say, self.acc.autocast)

    def wrap_student(self) -> None:
        """LoRA and trainable copies on the student (peft), gradient checkpointing if asked, the optimizer (a
        parameter group for the full parameters at ``lr``, one for the adapters at ``lora_lr``)."""
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            if hasattr(self.student, "activation_checkpointing_enable"):  # the name from transformers 5.x on
                self.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = wrap_peft(self.student, cfg)
        cast_untrained(self.model, self.frozen_dtype)  # peft's frozen originals of the trained modules
        if cfg.shard:  # from the host: each unit goes to the device as it is sharded (one layer whole at a time)
            shard.shard_model(self.model, self.acc.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.n_train = sum(p.numel() for p in self.params)
        groups = [{"params": [p for n, p in named if "lora_" not in n], "peak_lr": cfg.lr},
                  {"params": [p for n, p in named if "lora_" in n], "peak_lr": cfg.lora_lr or cfg.lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def resume(self) -> None:
        """The trained tensors, optimizer, logs and RNG of this run's checkpoint; else a fresh seed."""
        saved = self.saved
        if saved is None:
            torch.manual_seed(self.cfg.seed)
            return
        missing = set(n for n, p in self.model.named_parameters() if p.requires_grad) - set(saved["trainable"])
        if missing:
            raise MLAError(f"checkpoint {self.ckpt_path} lacks {len(missing)} trained tensors; re-run with --restart")
        if self.cfg.shard:
            shard.load_state(self.model, self.optimizer, saved["trainable"], saved["optimizer"])
        else:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in saved["trainable"]:
                        p.copy_(saved["trainable"][name])
            self.optimizer.load_state_dict(saved["optimizer"])
        self.start_step, self.history, self.evals = saved["step"], saved["history"], saved["evals"]
        self.teacher_nll = saved.get("teacher_nll")
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():  # dropout on the GPU resumes too
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.say(f"resuming from {self.ckpt_path} at step {self.start_step}/{self.total_steps}")

    def prepare(self) -> None:
        """The student and optimizer handed to accelerate (data parallel), or the teacher sharded as the student was
        (``shard``); the teacher's weights loaded beside the student."""
        cfg = self.cfg
        if cfg.shard:  # FSDP2 shards in place: no DDP wrapper; the teacher is sharded on its own
            self.inner = self.model
            self.teacher_model, shared = load_teacher(self.teacher_source, self.teacher_config, None,
                                                      torch.device("cpu"), self.frozen_dtype)
            shard.shard_model(self.teacher_model, self.acc.device)  # as the student: never whole on the device
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
            self.inner = self.acc.unwrap_model(self.model)
            self.teacher_model, shared = load_teacher(self.teacher_source, self.teacher_config, self.inner,
                                                      self.acc.device, self.frozen_dtype)
        own = param_bytes(self.teacher_model) - shared
        self.say(f"teacher shares {shared / 2**20:.0f} MiB of frozen weights with the student (embeddings, MLP, head); "
                 f"its own {own / 2**20:.0f} MiB (attention, trained norms)")
        shards = self.acc.num_processes if cfg.shard else 1
        self.memory = {"estimate": estimate(self.inner, self.teacher_config, cfg.seq_len, self.micro,
                                            cfg.gradient_checkpointing, self.frozen_dtype, self.bf16, own, shards)}
        self.say(f"memory per process, estimated: {describe(self.memory['estimate'])}")
        check_batch(self.memory["estimate"], self.acc.device, ("weights", "teacher"), cfg, self.micro)

    def train(self) -> None:
        """Distillation from ``start_step`` to the last step; on Ctrl-C a checkpoint, then KeyboardInterrupt."""
        cfg, total = self.cfg, self.total_steps
        if self.start_step == 0 and not self.evals:
            self.evaluate(0)
        self.model.train()
        bar = tqdm(range(self.start_step, total), desc="recover", unit="step", initial=self.start_step, total=total,
                   disable=not self.main)
        self.t_run, self.steps_run = time.time(), 0
        reset_peak_memory(self.acc.device)
        with StopFlag() as stop:
            for step in bar:
                self.train_step(step, bar)
                done = step + 1
                if done % cfg.eval_every == 0 and done < total:
                    self.evaluate(done)
                if done % cfg.checkpoint_every == 0 or stop.set:
                    self.checkpoint(done)
                if stop.set and done < total:
                    bar.close()
                    self.say(f"interrupted: checkpoint at step {done}/{total} in {self.ckpt_dir}; re-run the same "
                             "command to resume")
                    raise KeyboardInterrupt
        bar.close()
        self.memory["measured"] = peak_memory(self.acc.device)  # since training (these steps) began
        if self.cache is not None:
            c = self.cache
            self.say(f"teacher top-{c.k} cache: {len(c.rows)} windows kept ({c.nbytes() / 2**20:.0f} MiB on the host); "
                     f"{c.hits} of {c.hits + c.misses} window passes distilled from it without a teacher forward")
        if not self.evals or self.evals[-1]["step"] != total:
            self.evaluate(total)
            self.checkpoint(total)

    def train_step(self, step: int, bar) -> None:
        """One optimizer step on this process's rows of the step's batch; MLAError on a non-finite loss or gradient."""
        cfg, acc = self.cfg, self.acc
        lr = lr_at(step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:  # each group's peak on the one schedule
            group["lr"] = lr * group["peak_lr"] / cfg.lr
        rows = batch_rows(step, cfg.batch_size, len(self.windows), cfg.seed)
        local = rows[acc.process_index * self.local_batch:(acc.process_index + 1) * self.local_batch]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, kl_sum, ce_sum, hid_sum = self._accumulate(local)
        if acc.num_processes > 1:  # log the global batch's losses, and stop on every process together
            sums = acc.reduce(torch.tensor([loss_sum, kl_sum, ce_sum, hid_sum], device=acc.device), reduction="mean")
            loss_sum, kl_sum, ce_sum, hid_sum = (float(v) for v in sums)
        if not math.isfinite(loss_sum):
            raise MLAError(_nonfinite("loss", loss_sum, step, cfg, self.ckpt_path))
        params = self.params
        if cfg.shard:
            grad_norm = shard.clip_gradients(params, cfg.grad_clip)
        else:
            grad_norm = float(acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if not math.isfinite(grad_norm):
            raise MLAError(_nonfinite("gradient norm", grad_norm, step, cfg, self.ckpt_path))
        self.optimizer.step()
        self.steps_run += 1
        tokens_per_step = cfg.batch_size * cfg.seq_len
        self.history.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_sum, "kl": kl_sum,
                             "ce": ce_sum, "hidden": hid_sum, "lr": lr, "grad_norm": grad_norm})
        rate = self.steps_run * tokens_per_step / (time.time() - self.t_run)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")

    def _accumulate(self, local: torch.LongTensor) -> tuple[float, float, float, float]:
        """Forward and backward over ``local`` (row indices) in micro-batches: the (loss, kl, ce, hidden) means."""
        cfg, acc = self.cfg, self.acc
        kl_sum = ce_sum = loss_sum = hid_sum = 0.0
        for part in local.split(self.micro):
            ids = self.windows[part].to(acc.device)  # (micro, seq_len)
            t_out, target = self._teacher(part.tolist(), ids)
            with acc.autocast():
                s_out = self.model(input_ids=ids, use_cache=False, output_hidden_states=cfg.hidden_weight > 0)
            loss, kl, ce, hid = distill_loss(s_out, t_out, ids, cfg, target)
            weight = len(part) / len(local)
            acc.backward(loss * weight)
            loss_sum += float(loss.detach()) * weight
            kl_sum += float(kl) * weight
            ce_sum += float(ce) * weight
            hid_sum += float(hid) * weight
            del t_out, s_out, loss
        return loss_sum, kl_sum, ce_sum, hid_sum

    def _teacher(self, rows: list[int], ids: torch.LongTensor):
        """The teacher's output for windows ``rows`` (``ids``), or with ``teacher_topk`` its cached top-k targets
        (a forward only for windows not seen before): (output or None, targets or None)."""
        cache, acc = self.cache, self.acc
        target = cache.lookup(rows, acc.device) if cache is not None else None
        missed = target is None
        if self.cfg.shard and cache is not None:  # a sharded teacher's forward needs every process: one miss, all run
            missed = float(acc.reduce(torch.tensor([float(missed)], device=acc.device), reduction="sum")) > 0
        if not missed:
            return None, target
        with torch.no_grad(), acc.autocast():
            t_out = self.teacher_model(input_ids=ids, use_cache=False, output_hidden_states=self.cfg.hidden_weight > 0)
        if cache is None:
            return t_out, None
        return None, target if target is not None else cache.put(rows, t_out.logits, acc.device)

    def evaluate(self, step: int) -> None:
        """Validation perplexity after ``step`` steps, and its ratio to the teacher's (no-op without val_data)."""
        if self.val is None:
            return
        cfg = self.cfg
        with self.acc.autocast():
            if self.teacher_nll is None:
                self.teacher_nll = val_nll(self.teacher_model, self.val, self.micro)
            self.inner.eval()
            nll = val_nll(self.inner, self.val, self.micro)
            self.inner.train()
        teacher_nll = self.teacher_nll
        self.evals.append({"step": step, "tokens": step * cfg.batch_size * cfg.seq_len, "val_ppl": math.exp(nll),
                           "teacher_val_ppl": math.exp(teacher_nll), "ratio": math.exp(nll - teacher_nll)})
        self.say(f"step {step}: val perplexity {math.exp(nll):.2f} ({math.exp(nll - teacher_nll):.3f}x the teacher's)")

    def checkpoint(self, step: int) -> None:
        """The run's state after ``step`` steps to ``OUT.ckpt/checkpoint.pt`` (by the main process)."""
        if self.cfg.shard:  # gathered by every process together
            trainable, optim = shard.trained_state(self.model), shard.optimizer_state(self.model, self.optimizer)
        elif self.main:
            trainable, optim = trainable_state(self.inner), self.optimizer.state_dict()
        if self.main:
            write_checkpoint(self.ckpt_path, self.fingerprint, self.cfg, self.inputs, step, trainable, optim,
                             self.history, self.evals, self.teacher_nll)
        self.acc.wait_for_everyone()

    def export(self) -> dict | None:
        """OUT written (``export.py``) by the main process; then the checkpoints are removed."""
        result = None
        self.optimizer.zero_grad(set_to_none=True)
        del self.optimizer, self.teacher_model  # the export needs neither: free their memory first
        if self.cfg.shard:
            self.inner = self._gathered()
        if self.main:
            result = write_recovered(self.inner, self.converted, self.out, self.record, self.cfg, self.teacher, self.history,
                             self.evals, self.n_train, self.overwrite, self.val, self.micro, self.acc, self.started,
                             self.ckpt_dir, self.local_record,
                             {"data_windows": len(self.windows), "memory": getattr(self, "memory", None)})
        self.acc.wait_for_everyone()
        if self.main:
            for path in (self.ckpt_path, self.ckpt_dir / LOCAL_CKPT):
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a save cut short by a kill
            with contextlib.suppress(OSError):
                self.ckpt_dir.rmdir()
        return result

    def _gathered(self):
        """A sharded run's student, whole on the main process (None elsewhere), for the export."""
        trained = shard.trained_state(self.model)
        self.model = self.inner = None
        return _unsharded(self.converted, self.cfg, trained, self.acc.device) if self.main else None


def _unsharded(converted: Path, cfg: RecoverConfig, trained: dict, device) -> torch.nn.Module:
    """The student rebuilt whole (its frozen weights as read) with the ``trained`` tensors of a sharded run."""
    model = wrap_peft(load_student(converted), cfg)
    result = model.load_state_dict(trained, strict=False)
    if set(trained) != {n for n, p in model.named_parameters() if p.requires_grad}:
        raise MLAError(f"internal error: the gathered tensors do not fit the student ({result})")
    return model.to(device)


def _check_launch() -> None:
    """MLAError for an accelerate FSDP or DeepSpeed config: on one process it shards nothing; on several, mla
    finetune shards with its own FSDP2 setup (``shard=true`` under a plain multi-process launch), since the student
    and the teacher share their frozen weights and its checkpoints gather what is sharded."""
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true"):
            name = "FSDP" if engine == "FSDP" else "DeepSpeed"
            if int(os.environ.get("WORLD_SIZE", "1")) < 2:
                raise MLAError(f"an {name} config on one process: it shards over processes, so launch several "
                               f"(accelerate launch --num_processes N, N >= 2) or drop the config")
            raise MLAError(f"an accelerate {name} config: mla finetune shards by itself; launch plain processes "
                           "(accelerate launch --config_file recipes/accelerate/multi-gpu.yaml --num_processes N) "
                           "and add shard=true")


def _nonfinite(what: str, value: float, step: int, cfg: RecoverConfig, ckpt_path: Path) -> str:
    kept = f"the last checkpoint ({ckpt_path}) is kept" if ckpt_path.exists() else "no checkpoint was written"
    return (f"{what} became {value} at step {step + 1}; stopped ({kept}). Lower lr (now {cfg.lr:g}) or check the "
            "converted weights and the training text")
