"""The settings of recovery fine-tuning (``mla finetune`` and a recipe's ``recover:`` section): ``RecoverConfig``.

Its field docs become ``mla finetune --help``; recipe YAML keys and ``key=value`` overrides are its field names.
"""

from dataclasses import dataclass

from ..config import Default, check_finite, opt, split_list
from ..data import MIXES, split_sources
from ..deepseek import FORMATS
from ..errors import MLAError, quote

LORA_DEFAULT_TARGETS = "gate_proj,up_proj,down_proj"
# Every module the conversion writes or re-derives (k_a_proj: the normalized keys' latent with QK-norm) and the
# norms (a family without one of them, e.g. OLMo 2's input_layernorm, simply has none to train).
FULL_DEFAULT_TARGETS = "q_proj,kv_a_proj_with_mqa,k_a_proj,kv_b_proj,o_proj,input_layernorm,post_attention_layernorm,norm"


@dataclass
class RecoverConfig:
    """Recovery fine-tuning (``mla finetune``, and the ``recover:`` section of a recipe)."""

    data: str = opt(
        "brown",
        "Training text: comma-separated sources, each in the forms --calib takes (brown[:genres], pydoc, bbc[:cat], a "
        ".txt/.jsonl file or folder, hf:ID[:CONFIG]:SPLIT[:COLUMN], file:PATH), each read up to 16 bytes per training "
        "token; how a mix draws from them: data_mix. Must not include val_data.",
    )
    data_mix: str = opt(
        "balanced", "How a mix of several data sources makes the training windows: balanced (as many windows from each "
        "source as the smallest has: every source weighs the same) or all (every window of every source, interleaved: "
        "more distinct text before the windows repeat, each source weighing by its size).")
    tokens: int = opt(300_000, "Training tokens in all (steps = tokens / (batch_size * seq_len), rounded up).")
    seq_len: int = opt(Default(512), "Tokens per training sequence (BOS + text); the default is cut to the model's "
                       "max_position_embeddings when that is smaller.")
    batch_size: int = opt(4, "Sequences per optimizer step (over all processes). A batch whose memory estimate "
                          "exceeds the available memory (the GPU's, or the host's) is refused before training.")
    micro_batch: int | None = opt(None, "Sequences per forward pass (gradient accumulation); default batch_size.")
    lr: float = opt(3e-4, "Peak learning rate (AdamW) of the full_targets parameters (and of LoRA without lora_lr).")
    lora_lr: float | None = opt(
        None, "Peak learning rate of the LoRA adapters (their own AdamW parameter group, the same schedule); default: "
        "lr. Adapters start at zero and often want a higher rate than the full parameters they sit beside.")
    schedule: str = opt("cosine", "Learning-rate schedule after warm-up: cosine, linear or constant.")
    warmup_steps: int = opt(5, "Linear warm-up steps.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of lr (cosine and linear).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this (0: no clipping).")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_targets: str = opt(
        LORA_DEFAULT_TARGETS, "Comma-separated module names that get LoRA adapters. '' for none: every trained module "
        "is then a full parameter (all-parameter training: put the MLP's gate_proj,up_proj,down_proj in full_targets), "
        "and OUT has no adapter folder. On a model whose lm_head shares its weight with embed_tokens "
        "(tie_word_embeddings), an adapter on either of them (LoRA on lm_head, or either in full_targets beside LoRA) "
        "unties them first, as peft advises: only the module named trains, and OUT gets its own lm_head.weight "
        "(vocab x hidden more) with tie_word_embeddings false (recovery.untied_embeddings in mla_conversion.json).")
    full_targets: str = opt(
        FULL_DEFAULT_TARGETS,
        "Comma-separated module names trained as full parameters (peft modules_to_save; matched as suffixes of module "
        "paths, so 'norm' also matches every *_layernorm and QK-norm). Default: the MLA attention projections and the "
        "norms the model has ('' for none). With tied embeddings, lm_head or embed_tokens here trains the one shared "
        "matrix when lora_targets is '' (as transformers does), and is untied first beside LoRA (see lora_targets).",
    )
    kd_weight: float = opt(1.0, "Weight of the distillation loss: KL(teacher || student) of next-token distributions.")
    ce_weight: float = opt(0.0, "Weight of the next-token cross-entropy on the training text.")
    temperature: float = opt(1.0, "Distillation temperature (the KL is scaled by its square).")
    teacher_topk: int = opt(
        0, "Keep the teacher's top-k log-probabilities of every training position the first time a window is seen, "
        "and distil later passes over it from that cache instead of a teacher forward (0: a forward every step). The "
        "KL is then over the k tokens plus one bucket for the rest of the vocabulary. Saves the teacher's forward on "
        "every epoch after the first (the mix repeats when tokens exceed its windows); host memory: windows x "
        "seq_len x (8 k + 4) bytes in each process of the host (each keeps the windows it passes over), refused "
        "before training past half of the host's memory.")
    hidden_weight: float = opt(
        0.0, "Weight of an extra loss on every layer's output hidden states: mean over layers and tokens of "
        "|h_student - h_teacher|^2 / |h_teacher|^2.")
    local_tokens: int = opt(
        0, "Layer-local stage before the distillation (0: none): tokens of the training text on which every layer's "
        "attention (its full_targets) learns, one layer at a time, to reproduce the original attention's output on "
        "the original model's hidden states. A step runs one attention block, not the whole model.")
    local_epochs: float = opt(
        2.0, "Passes over the layer-local tokens per layer (steps = epochs * windows / local_batch).")
    local_batch: int | None = opt(
        None, "Windows per step of the layer-local stage (at most the stage's windows); default batch_size. Smaller "
        "batches give more steps per layer over the same tokens (a step runs one attention block).")
    local_lr: float = opt(1e-3, "Peak learning rate of the layer-local stage (Adam, cosine to 0 within each layer).")
    local_inputs: str = opt(
        "teacher", "Hidden states the layer-local stage feeds each attention: teacher (the original model's) or "
        "student (the student's own, through the layers trained before it; the target then also cancels their drift).")
    teacher: str | None = opt(None, "Teacher model; default: the source recorded in the converted model's mla_conversion.json.")
    val_data: str = opt("bbc:tech", "Held-out text for the perplexity-ratio curve logged during training ('' for none).")
    val_tokens: int = opt(4096, "Tokens of val_data evaluated (in seq_len windows).")
    eval_every: int = opt(20, "Evaluate on val_data every this many steps (and at the start and the end).")
    checkpoint_every: int = opt(10, "Write a resumable checkpoint every this many steps.")
    seed: int = opt(0, "Seed for data order, LoRA initialisation and dropout.")
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu or cuda; accelerate launch sets it per process.")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")
    frozen_dtype: str = opt(
        "auto", "Dtype of the weights training leaves frozen (embeddings, MLP base weights, output head, the teacher): "
        "auto (bfloat16 when training runs in bf16, i.e. on CUDA by default; else float32), float32 or bfloat16. The "
        "trained tensors, their gradients and the optimizer state stay float32. bfloat16 halves the frozen weights' "
        "memory (an 8B model's 15 GB instead of 30) and needs bf16 precision.")
    shard: bool = opt(
        False, "Shard the student's and the teacher's weights, the gradients and AdamW's state over the processes "
        "(torch FSDP2: each decoder layer one fully_shard unit) instead of a whole copy in each (data parallel): for "
        "models whose training state does not fit one GPU. Needs several processes (accelerate launch "
        "--num_processes N, or torchrun); the layer-local stage still runs whole in each process.")
    gradient_checkpointing: bool = opt(
        False, "Recompute each decoder layer's activations in the backward pass instead of storing them (less memory "
        "for big models and long sequences, about a third more compute; the same losses).")
    format: str | None = opt(
        None, "Output format: mla or deepseek_v3 (a stock DeepseekV3ForCausalLM checkpoint; the converted model must "
        "meet its constraints, i.e. come from mla convert --format deepseek_v3). Default: the converted model's own "
        "format. Training always runs with the latent norm in place.")

    @property
    def adapters(self) -> bool:
        """Whether training puts LoRA adapters (peft) on ``lora_targets``; False: all-parameter training, no adapter."""
        return bool(split_list(self.lora_targets))

    @property
    def local_step_windows(self) -> int:
        """Windows per step of the layer-local stage: ``local_batch``, by default ``batch_size``."""
        return self.local_batch or self.batch_size

    def validate(self) -> None:
        check_finite(self, flags=False)
        for name in ("tokens", "seq_len", "batch_size", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise MLAError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise MLAError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.local_batch is not None and self.local_batch < 1:
            raise MLAError(f"local_batch must be >= 1, got {self.local_batch}")
        if self.micro_batch is not None and not 1 <= self.micro_batch <= self.batch_size:
            raise MLAError(f"micro_batch must be in [1, batch_size={self.batch_size}], got {self.micro_batch}")
        for name in ("warmup_steps", "val_tokens", "weight_decay", "grad_clip", "kd_weight", "ce_weight",
                     "lora_dropout", "hidden_weight"):
            if getattr(self, name) < 0:
                raise MLAError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.local_tokens < 0 or self.local_epochs < 0:
            raise MLAError(f"local_tokens and local_epochs must be >= 0, got {self.local_tokens} and {self.local_epochs}")
        if self.local_tokens and not (self.local_epochs > 0 and self.local_lr > 0):
            raise MLAError(f"local_epochs and local_lr must be > 0 with local_tokens, got {self.local_epochs} and "
                           f"{self.local_lr}")
        if self.local_tokens and not split_list(self.full_targets):
            raise MLAError("local_tokens needs full_targets: the layer-local stage trains the attention modules named there")
        if not self.lr > 0 or (self.lora_lr is not None and not self.lora_lr > 0):
            raise MLAError(f"lr and lora_lr must be > 0, got {self.lr} and {self.lora_lr}")
        if self.teacher_topk < 0:
            raise MLAError(f"teacher_topk must be >= 0, got {self.teacher_topk}")
        if self.teacher_topk and self.hidden_weight:
            raise MLAError("teacher_topk caches the teacher's logits only: it cannot serve hidden_weight, which needs "
                           "the teacher's hidden states every step")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MLAError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise MLAError(f"lora_r must be >= 1 and lora_alpha > 0, got {self.lora_r} and {self.lora_alpha}")
        if self.temperature <= 0:
            raise MLAError(f"temperature must be > 0, got {self.temperature}")
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise MLAError("kd_weight, ce_weight and hidden_weight are all 0: nothing to train on")
        choices = {"schedule": ("cosine", "linear", "constant"), "data_mix": MIXES,
                   "local_inputs": ("teacher", "student"), "device": ("auto", "cpu", "cuda"),
                   "precision": ("auto", "fp32", "bf16"), "frozen_dtype": ("auto", "float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MLAError(f"{name} must be one of {', '.join(allowed)}, got {quote(getattr(self, name))}")
        if self.frozen_dtype == "bfloat16" and self.precision == "fp32":
            raise MLAError("frozen_dtype=bfloat16 needs precision bf16 (or auto on CUDA): float32 activations cannot "
                           "meet bfloat16 weights outside autocast")
        if not self.adapters and not split_list(self.full_targets):
            raise MLAError("lora_targets and full_targets are both empty: nothing to train")
        if self.lora_lr is not None and not self.adapters:
            raise MLAError("lora_lr without lora_targets: there are no LoRA adapters to give it to")
        if set(split_list(self.lora_targets)) & set(split_list(self.full_targets)):
            raise MLAError("a module cannot be in both lora_targets and full_targets")
        if not split_sources(self.data or ""):
            raise MLAError("data is empty: give at least one training text source")
        if self.format is not None and self.format not in FORMATS:
            raise MLAError(f"format must be one of {', '.join(FORMATS)}, got {quote(self.format)}")
        if self.val_data and self.val_data.strip() in split_sources(self.data):
            raise MLAError(f"val_data {quote(self.val_data)} is also training data; evaluate on held-out text")
        if self.val_data and self.val_tokens and self.val_tokens < self.seq_len:
            raise MLAError(f"val_tokens ({self.val_tokens}) must be 0 or >= seq_len ({self.seq_len})")

