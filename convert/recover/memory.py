"""What a distillation step holds in memory, estimated before training from the wrapped student's parameters and the
settings (``mla finetune`` prints it and records it beside the measured peak; ``tools/recover_memory.py`` runs it for
a real shape on the meta device, without the weights).

The terms, in bytes:

- ``weights``: the student's parameters as they are (frozen ones in ``frozen_dtype``, trained ones float32, peft's
  frozen originals of the trained modules);
- ``gradients`` and ``optimizer``: 4 and 8 bytes (AdamW's two moments) per trained element;
- ``teacher``: the teacher's own tensors (its attention projections, its copies of trained norms), in
  ``frozen_dtype``; everything else it shares with the student;
- ``activations``: per micro-batch of ``tokens = micro * seq_len``: the logits (student and teacher, float32, their
  log-softmaxes and the KL's gradient: ``LOGIT_COPIES`` float32 copies of ``tokens x vocab``), and the decoder
  layers' saved activations: every layer's input only under gradient checkpointing (plus one layer's working set),
  every layer's working set without it. A layer's working set is ``LAYER_WIDTHS`` hidden-size-wide, 4 MLP-wide and
  4 attention-wide (heads x head width) vectors per token in the activation dtype.

The layer-local stage before it (``estimate_local``) holds other things: the whole student on the device (each
process's, sharded or not), the stage's hidden states of all its windows, two of the original's layers, and one
attention layer's training.

``check_memory`` refuses, before it is allocated, what an estimate says cannot fit: what is still to allocate against
the device's free memory (CUDA) or this process's share of the host's available memory (``MemAvailable``).
"""

from __future__ import annotations

import os

import torch

from ..errors import MLAError

LOGIT_COPIES = 6
LAYER_WIDTHS = 8
MEMINFO = "/proc/meminfo"


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_elements(config) -> int:
    """Elements of the original model's attention projections (the teacher's own weights), all layers."""
    text = _text(config)
    d, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    return text.num_hidden_layers * d * head_dim * (2 * heads + 2 * kv)


def estimate(model, teacher_config, seq_len: int, micro: int, gradient_checkpointing: bool,
             frozen_dtype: torch.dtype, bf16: bool, teacher_bytes: int | None = None,
             shards: int = 1) -> dict[str, int]:
    """The terms (bytes) of one process's peak during distillation, and their ``total``; ``model``: the student
    wrapped by peft (on any device, ``meta`` included); ``teacher_bytes``: the teacher's own bytes when it is loaded
    (else all of its attention projections, an upper bound: peft's frozen originals may share some); ``shards``: the
    processes a sharded run splits weights, gradients, optimizer state and teacher over."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    terms = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": 4 * trained,
        "optimizer": 8 * trained,
        "teacher": teacher_bytes if teacher_bytes is not None else
        attention_elements(teacher_config) * torch.empty((), dtype=frozen_dtype).element_size(),  # host
        "activations": activations(model.config, seq_len, micro, gradient_checkpointing, bf16),
    }
    for key in ("weights", "gradients", "optimizer", "teacher"):
        terms[key] = -(-terms[key] // shards)
    return terms | {"total": sum(terms.values())}


def activations(config, seq_len: int, micro: int, gradient_checkpointing: bool, bf16: bool) -> int:
    """The ``activations`` term of ``estimate`` (bytes): it needs only the student's ``config``, so a batch that cannot
    fit is known before anything is loaded for it."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", 4 * d)
    heads = config.num_attention_heads
    width = heads * max(getattr(config, "v_head_dim", 0) or 0, getattr(config, "head_dim", 0) or d // heads)
    tokens, act = micro * seq_len, 2 if bf16 else 4
    layer = tokens * (LAYER_WIDTHS * d + 4 * inter + 4 * width) * act
    saved = tokens * d * act * layers + layer if gradient_checkpointing else layer * layers
    return LOGIT_COPIES * tokens * vocab * 4 + saved


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def describe(terms: dict[str, int]) -> str:
    parts = ", ".join(f"{k} {gib(v)}" for k, v in terms.items() if k != "total")
    return f"{gib(terms['total'])} ({parts})"


def estimate_local(student, teacher_config, windows: int, seq_len: int, step_windows: int, layer_trained: int,
                   student_inputs: bool) -> dict[str, int]:
    """The terms (bytes) of the layer-local stage's peak, and their ``total``: ``weights``, the student as it is (the
    stage puts it whole on the device); ``hidden_states``, float32 ``(windows, seq_len, hidden)`` tensors (the
    original's input, output and attention output of the current layer, and the student's own stream with
    ``student_inputs``); ``original_layers``, the current and next layer of the original in float32; ``training``,
    one layer's ``layer_trained`` elements with their gradients and Adam's moments (16 bytes each) and the float32
    working set of ``step_windows`` windows through one attention layer (its scores included)."""
    config = student.config
    d, heads = config.hidden_size, config.num_attention_heads
    inter = getattr(config, "intermediate_size", 4 * d)
    width = heads * max(getattr(config, "v_head_dim", 0) or 0, getattr(config, "head_dim", 0) or d // heads)
    layers = _text(teacher_config).num_hidden_layers
    tokens = step_windows * seq_len
    terms = {
        "weights": sum(p.numel() * p.element_size() for p in student.parameters()),
        "hidden_states": (4 if student_inputs else 3) * windows * seq_len * d * 4,
        "original_layers": 2 * 4 * (attention_elements(teacher_config) // layers + 3 * d * inter + 2 * d),
        "training": 16 * layer_trained + tokens * (LAYER_WIDTHS * d + 4 * width) * 4
        + step_windows * heads * seq_len * seq_len * 4,
    }
    return terms | {"total": sum(terms.values())}


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take on ``device``: on CUDA the device's free memory and what torch's allocator
    holds unused; else the host's ``MemAvailable`` (its free pages where that is not known); None when neither is."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return None


def local_processes() -> int:
    """The processes of this launch on this host (``LOCAL_WORLD_SIZE``, set by torchrun and accelerate launch; else
    ``WORLD_SIZE``, all of them; else 1): they share its memory."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def _size(n: int) -> str:
    return gib(n) if n >= 2**20 else f"{n} bytes"


def check_memory(terms: dict[str, int], device: torch.device, held: tuple[str, ...], what: str, fix: str = "") -> None:
    """MLAError when the ``terms`` (bytes, as ``estimate`` gives them) not in ``held`` (those already allocated) exceed
    the memory available on ``device``: on the host, this process's share among its ``local_processes``. ``what``
    names the setting, ``fix`` says what to lower."""
    need = {k: v for k, v in terms.items() if k != "total" and k not in held}
    free = available_bytes(device)
    if free is None:
        return
    share = local_processes() if device.type == "cpu" else 1
    if sum(need.values()) > free // share:
        parts = ", ".join(f"{k} {_size(v)}" for k, v in need.items())
        where = f"on {device}" if device.type == "cuda" else "on the host" if share == 1 else \
            f"to each of the {share} processes on the host"
        raise MLAError(f"{what} needs an estimated {_size(sum(need.values()))} ({parts}), more than the "
                       f"{_size(free // share)} available {where}{'; ' + fix if fix else ''}")


def check_batch(terms: dict[str, int], device: torch.device, held: tuple[str, ...], cfg, micro: int) -> None:
    """``check_memory`` of the distillation's batch (``cfg``: a ``RecoverConfig``; ``micro``: sequences per forward
    in this process), naming the settings that set it."""
    what = f"batch_size {cfg.batch_size} (micro-batches of {micro} x {cfg.seq_len} tokens per process)"
    fix = "lower batch_size or micro_batch (or seq_len)" + (
        "" if cfg.gradient_checkpointing else ", or set gradient_checkpointing=true")
    check_memory(terms, device, held, what, fix)
