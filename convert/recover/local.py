"""Layer-local recovery: each converted attention block learns to reproduce the original block's output.

Run by ``mla finetune`` before the end-to-end distillation when ``local_tokens > 0``. For every decoder layer ``i`` in
turn, on ``local_tokens`` of the training text:

- the original layer ``i`` is materialised from the source (one layer in memory, as in the conversion) and run on the
  original model's hidden states ``x_i``; a hook keeps its attention output ``a_i`` (the target);
- the student's attention of layer ``i`` (the ``full_targets`` among its modules) is trained with Adam to minimise
  ``|attn_student(x_i) - a_i|^2 / mean |a_i|^2`` over ``local_epochs`` passes (cosine learning rate from
  ``local_lr``); a layer whose error on these tokens does not fall keeps its weights;
- no full forward pass, no output head: a step costs one attention block, so far more tokens per CPU-minute than
  end-to-end distillation.

With ``local_inputs=student`` the student's attention sees the student's own hidden states (the trained layers
before it) and learns to cancel their drift as well. After each layer the trained tensors go to ``OUT.ckpt/local.pt``
(atomically); a killed run resumes after the last finished layer and ends with the same weights.

Launched on several processes (``accelerate launch``, ``torchrun``), the processes share the layers instead of each
training all of them: with the original's inputs each trains every ``world``-th layer and the checkpoint follows
each round of ``world`` layers; with the student's own inputs the main process trains and the others receive. Either
way every process ends with the same weights (a sharded run's shards then come from one model).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..adapters import attention_prefix, read_layout, text_config
from ..config import split_list
from ..device import peak_memory, reset_peak_memory
from ..errors import MLAError
from ..layerwise import LayerwiseModel, causal_mask
from ..readers import open_reader
from ..save import save_checkpoint
from .checkpoint import fingerprinted_settings, read_checkpoint
from .config import RecoverConfig
from .losses import val_nll
from .memory import check_memory, describe, estimate_local
from .models import matching_modules

LOCAL_CKPT = "local.pt"
CHUNK = 8  # sequences per no-grad forward


def local_windows(windows: torch.LongTensor, cfg: RecoverConfig) -> torch.LongTensor:
    """The ``ceil(local_tokens / seq_len)`` training windows of the stage (a seeded draw, at most all of them)."""
    n = min(len(windows), math.ceil(cfg.local_tokens / cfg.seq_len))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919))  # host
    return windows[order[:n].sort().values]


def step_windows(cfg: RecoverConfig, windows: int) -> int:
    """Windows per step of the stage over ``windows`` windows: ``local_step_windows``, at most all of them."""
    return min(cfg.local_step_windows, windows)


def trained_params(student, i: int, cfg: RecoverConfig) -> dict[str, torch.nn.Parameter]:
    """The parameters of layer ``i``'s attention that the stage trains: those of its modules in ``full_targets``
    (matched as suffixes of module paths, as peft's ``modules_to_save``)."""
    modules = matching_modules(student.model.layers[i].self_attn, split_list(cfg.full_targets),
                               attention_prefix(i).rstrip("."))
    return {f"{path}.{name}": p for path, module in modules for name, p in module.named_parameters(recurse=False)}


def _attention(layer, x: torch.Tensor, rope, mask) -> torch.Tensor:
    """The student layer's attention output on its input hidden states ``x`` (B, T, d), before the residual."""
    h = x if layer.layout == "post" else layer.input_layernorm(x)
    return layer.self_attn(h, position_embeddings=rope, attention_mask=mask)[0]


class _Student:
    """The student's RoPE tables and masks at positions 0..T-1, for running single decoder layers."""

    def __init__(self, student, seq_len: int, device):
        self.model, self.device = student, device
        self.pos = torch.arange(seq_len, device=device)[None]
        probe = torch.zeros(1, seq_len, student.config.hidden_size, device=device)
        rope = student.model.rotary_emb.all(probe, self.pos)
        self.rope = rope[None] if None in rope else rope

    def mask(self, i: int, x: torch.Tensor):
        return causal_mask(self.model.config, self.model.config.layer_types[i], x, self.pos)

    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return _attention(self.model.model.layers[i], x, self.rope, self.mask(i, x))

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.model.layers[i](x, attention_mask=self.mask(i, x), position_embeddings=self.rope)


def _chunked(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[j:j + CHUNK]) for j in range(0, len(x), CHUNK)])


def _teacher_layer(lw, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, attention output) of the original layer ``i`` on ``x``; the attention output is taken by a hook on
    its ``self_attn`` module (every supported family names it so)."""
    outs, attns = [], []
    hook = lw.base.layers[i].self_attn.register_forward_hook(lambda m, args, out: attns.append(out[0].detach()))
    try:
        with torch.no_grad():
            for j in range(0, len(x), CHUNK):
                outs.append(lw.run(i, x[j:j + CHUNK]))
    finally:
        hook.remove()
    return torch.cat(outs), torch.cat(attns)


def _error(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum(-1).mean() / scale


def run_local(student, lw, ids: torch.LongTensor, cfg: RecoverConfig, ckpt_path: Path, fingerprint: str,
              resume: dict | None, main: bool = True, say=print, extra: dict | None = None,
              autocast=contextlib.nullcontext) -> dict:
    """Train every layer's attention of ``student`` (in place) to reproduce the original's, layer by layer.

    ``lw``: the original model as a ``LayerwiseModel``; ``ids``: (N, T) token windows (on the CPU, where the
    embedding rows are gathered); ``resume``: the state of ``ckpt_path`` from an interrupted run with the same
    ``fingerprint``; ``extra``: more fields for the record of a fresh run. Returns the stage's state: ``done`` layers,
    per-layer errors, the trained ``tensors``.

    Launched on several processes, they share the layers (``_Share``): every process runs the original's stream, each
    trains its own layers, and what they trained is sent to all, so every process ends with the same weights.
    """
    device = lw.device
    n_layers = len(student.model.layers)
    state = resume or {"fingerprint": fingerprint, "done": 0, "tensors": {}, "layers": [], "elapsed_s": 0.0,
                       **(extra or {})}
    batch = step_windows(cfg, len(ids))
    state["steps_per_layer"] = steps = max(1, round(cfg.local_epochs * len(ids) / batch))
    _restore(student, state, cfg, ckpt_path)
    if state["done"] >= n_layers:
        return state
    share = _Share(cfg)
    state["processes"] = share.world
    started = time.time() - state["elapsed_s"]
    runner = _Student(student, ids.shape[1], device)
    x_t = lw.embed(ids)  # (N, T, d) the original's hidden states, on the device (the rows gathered on the CPU)
    x_s = x_t.clone() if cfg.local_inputs == "student" else None
    lw.load(0)
    n, entries = len(ids), {}
    bar = tqdm(range(n_layers), desc="layer-local", unit="layer", disable=not main)
    for i in bar:
        nxt, target = _teacher_layer(lw, i, x_t)  # (N, T, d) each
        lw.release(i)
        if i + 1 < n_layers:
            lw.load(i + 1)
        if i >= state["done"] and share.owns(i):
            entries[i] = _train_layer(runner, i, x_t, x_s, target, cfg, steps) | {"process": share.rank}
            bar.set_postfix(error=f"{entries[i]['error_before']:.3f}->{entries[i]['error_after']:.3f}")
        if i >= state["done"] and share.round_ends(i, n_layers):
            _finish_round(runner.model, state, share, entries, i, cfg, ckpt_path, main, started)
        if x_s is not None:  # the student's own stream: its frozen MLP may be bfloat16
            with autocast():
                x_s = _chunked(lambda x, i=i: runner.layer(i, x), x_s).float()
        x_t = nxt
    bar.close()
    before, after = (sum(e[key] for e in state["layers"]) / n_layers for key in ("error_before", "error_after"))
    shared = f" on {share.world} processes" if share.world > 1 else ""
    say(f"layer-local stage: {n} windows, {steps} steps of {batch} per layer{shared}; mean relative "
        f"error of the attention output {before:.4f} -> {after:.4f}; {state['elapsed_s']:.0f}s")
    return state


class _Share:
    """How the processes of a launch share the stage. With the original's inputs (``local_inputs=teacher``) the
    layers are independent: process ``r`` of ``world`` trains layers ``i = r (mod world)``, a round of ``world``
    layers at a time, and at the round's end each layer's trainer sends it to the others. With the student's own
    inputs (``local_inputs=student``) layer ``i`` needs layer ``i - 1`` trained: the main process trains each layer
    and sends it before the next. One process: it trains every layer."""

    def __init__(self, cfg: RecoverConfig):
        on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.independent = cfg.local_inputs == "teacher"

    def owner(self, i: int) -> int:
        return i % self.world if self.independent else 0

    def owns(self, i: int) -> bool:
        return self.owner(i) == self.rank

    def round_ends(self, i: int, n_layers: int) -> bool:
        return not self.independent or i % self.world == self.world - 1 or i == n_layers - 1

    def send(self, params: dict[str, torch.nn.Parameter], entry: dict | None, owner: int) -> dict:
        """Every process gets ``owner``'s trained ``params`` (in place) and its record ``entry``."""
        if self.world == 1:
            return entry
        with torch.no_grad():
            for name in sorted(params):
                dist.broadcast(params[name].data, src=owner)
        box = [entry]
        dist.broadcast_object_list(box, src=owner)
        return box[0]


def _finish_round(student, state: dict, share: _Share, entries: dict, last: int, cfg: RecoverConfig,
                  ckpt_path: Path, main: bool, started: float) -> None:
    """The layers ``state["done"]..last`` trained (each by its owner) are sent to every process, recorded, and
    checkpointed by the main process."""
    for j in range(state["done"], last + 1):
        params = trained_params(student, j, cfg)
        entry = share.send(params, entries.pop(j, None), share.owner(j))
        state["layers"].append(entry)
        state["tensors"].update({name: p.detach().cpu().clone() for name, p in params.items()})
    state["done"] = last + 1
    state["elapsed_s"] = time.time() - started
    if main:
        save_checkpoint(ckpt_path, state)


def _restore(student, state: dict, cfg: RecoverConfig, ckpt_path: Path) -> None:
    """Put what the finished layers of ``state`` learned back into ``student``."""
    with torch.no_grad():
        own = {n: p for i in range(state["done"]) for n, p in trained_params(student, i, cfg).items()}
        for name, t in state["tensors"].items():
            if name not in own:
                raise MLAError(f"checkpoint {ckpt_path} holds {name}, which this run does not train; "
                               "re-run with --restart")
            own[name].copy_(t)


def _train_layer(runner: _Student, i: int, x_t: torch.Tensor, x_s: torch.Tensor | None, target: torch.Tensor,
                 cfg: RecoverConfig, steps: int) -> dict:
    """Train layer ``i``'s attention on its inputs (the original's ``x_t``, or the student's own ``x_s``) towards
    ``target``, the original attention's output (N, T, d); keep the old weights unless the error falls. Returns the
    layer's record."""
    layer = runner.model.model.layers[i]
    x_in = x_t if x_s is None else x_s
    if x_s is not None and layer.layout == "pre":  # also cancel the drift of the student's own stream
        target = target + (x_t - x_s) / layer.residual_multiplier
    scale = target.pow(2).sum(-1).mean().clamp_min(1e-12)
    params = trained_params(runner.model, i, cfg)
    for p in params.values():
        p.requires_grad_(True)
    before = _eval_error(runner, i, x_in, target, scale)
    initial = {name: p.detach().clone() for name, p in params.items()}
    layer.train()
    _fit(runner, i, x_in, target, scale, params, cfg, steps)
    layer.eval()
    for p in params.values():
        p.requires_grad_(False)
    after = _eval_error(runner, i, x_in, target, scale)
    kept = after < before
    if not kept:  # training did not help this layer (e.g. it was already exact): keep its weights
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(initial[name])
        after = before
    del initial
    return {"layer": i, "error_before": before, "error_after": after, "trained": kept}


def _fit(runner: _Student, i: int, x_in: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
         params: dict[str, torch.nn.Parameter], cfg: RecoverConfig, steps: int) -> None:
    """``steps`` Adam steps on ``params`` over batches of ``x_in`` rows (a seeded order per layer, reshuffled when
    used up), the learning rate cosine from ``local_lr`` to 0."""
    device, n = runner.device, len(x_in)
    batch = step_windows(cfg, n)
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg.local_lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
    order = torch.empty(0, dtype=torch.long)  # host: row order, moved with .to(device) when used
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.local_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])  # host
        rows, order = order[:batch], order[batch:]
        loss = _error(runner.attention(i, x_in[rows.to(device)]), target[rows.to(device)], scale)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise MLAError(f"layer-local stage: the loss of layer {i} became {value}; lower local_lr (now "
                           f"{cfg.local_lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _eval_error(runner: _Student, i: int, x: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> float:
    total = 0.0
    with torch.no_grad():
        for j in range(0, len(x), CHUNK):
            part = slice(j, j + CHUNK)
            total += float(_error(runner.attention(i, x[part]), target[part], scale)) * len(x[part])
    return total / len(x)


def run_stage(student, source, config, windows, val, cfg: RecoverConfig, device, ckpt_dir: Path, run_id: tuple,
              restart: bool, main: bool, say, autocast=contextlib.nullcontext) -> dict:
    """The layer-local stage (``run_local``) on ``student`` in place; resumes from ``OUT.ckpt/local.pt`` when
    ``run_id`` (fingerprint, inputs) is that checkpoint's. ``autocast``: the context of the student's whole-model
    forwards (its frozen weights may be bfloat16); the trained attention runs in float32."""
    path = ckpt_dir / LOCAL_CKPT
    fingerprint, inputs = run_id
    resume = read_checkpoint(path, fingerprint, cfg, inputs, restart)
    ids = local_windows(windows, cfg)
    memory = {"estimate": stage_estimate(student, config, len(ids), cfg)}
    say(f"layer-local stage memory per process, estimated: {describe(memory['estimate'])}")
    on_device = next(student.parameters()).device.type == torch.device(device).type
    check_memory(memory["estimate"], torch.device(device), ("weights",) if on_device else (),
                 f"the layer-local stage ({len(ids)} windows of {cfg.seq_len}, steps of {step_windows(cfg, len(ids))})",
                 "lower local_tokens or local_batch (or seq_len)")
    student.requires_grad_(False)
    student.to(device)
    extra = {"settings": fingerprinted_settings(cfg), "inputs": inputs}
    if resume is None and val is not None:  # the starting point, for the record
        with autocast():
            extra["val_nll_before"] = val_nll(student, val, cfg.micro_batch or cfg.batch_size)
    if resume is not None:
        say(f"layer-local stage: resuming from {path} after layer {resume['done']}")
    layout = read_layout(config)
    text = text_config(config)
    lw = LayerwiseModel(text, open_reader(source, text), device, torch.float32, layout.layer_types, layout.decoder)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_memory(torch.device(device))
    state = run_local(student, lw, ids, cfg, path, fingerprint, resume, main, say, extra=extra, autocast=autocast)
    memory["measured"] = peak_memory(torch.device(device))
    del lw
    record = {k: v for k, v in state.items() if k not in ("tensors", "fingerprint", "settings", "inputs")}
    return record | {"windows": len(ids), "memory": memory}


def stage_estimate(student, config, windows: int, cfg: RecoverConfig) -> dict[str, int]:
    """``estimate_local`` for the stage on ``windows`` windows of ``student`` (on any device, ``meta`` included) with
    the original's ``config``: the most elements one of its layers trains."""
    most = max(sum(p.numel() for p in trained_params(student, i, cfg).values())
               for i in range(len(student.model.layers)))
    return estimate_local(student, config, windows, cfg.seq_len, step_windows(cfg, windows), most,
                          cfg.local_inputs == "student")
