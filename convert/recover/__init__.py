"""Stage 8, recover: LoRA + distillation from the original model (``mla finetune``).

    mla finetune CONVERTED OUT --recipe recipes/smollm2-135m.yaml [key=value ...]

The student is the MLA export CONVERTED; the teacher is the model it was converted from (recorded in its
``mla_conversion.json``), run alongside. Per token, loss = kd_weight * T^2 * KL(teacher_T || student_T) + ce_weight *
cross-entropy (+ hidden_weight * relative error of every layer's hidden states). LoRA adapters (peft) go on
``lora_targets``; ``full_targets`` are trained as full parameters (peft ``modules_to_save``). Everything else is
frozen.

Long runs: a checkpoint is written to ``OUT.ckpt/`` every ``checkpoint_every`` steps (and on Ctrl-C); re-running the
same command resumes from it and ends with the same weights as an uninterrupted run. A non-finite loss or gradient
stops the run with an error. The export holds merged weights (loads without peft) and the adapter in peft format under
``adapter/``; ``mla_conversion.json`` gains a ``recovery`` record (data, tokens, losses, the validation curve).

Where things are (imports flow down this list, never up):

- ``run.py``: ``finetune`` (``mla finetune``) and ``convert_and_recover`` (``mla convert --recipe`` with a
  ``recover:`` section): check the inputs and OUT, lock it, run the recipe;
- ``recipe.py``: ``Recovery``, the run as named phases (setup, load_models, load_data, local_stage, wrap_student,
  resume, prepare, train, evaluate, checkpoint, export);
- ``local.py``: the layer-local stage; ``export.py``: the merged export, the adapter and the recovery record;
- ``models.py``: student, teacher, peft, the frozen weights' dtype; ``shard.py``: FSDP2 sharding over processes
  (``shard=true``); ``memory.py``: the memory estimate; ``windows.py``: the training and validation text;
  ``losses.py``: the loss (full or top-k KL), the learning-rate schedule, the held-out NLL; ``teacher_cache.py``: the
  teacher's cached top-k targets (``teacher_topk``); ``checkpoint.py``: what identifies a run,
  ``checkpoint.pt``, Ctrl-C;
- ``config.py``: ``RecoverConfig``, the settings.
"""

from .checkpoint import CKPT_NAME, work_dir
from .run import convert_and_recover, finetune
from .config import FULL_DEFAULT_TARGETS, LORA_DEFAULT_TARGETS, RecoverConfig
from .local import LOCAL_CKPT, local_windows, trained_params
from .losses import lr_at
from .models import load_teacher, wrap_peft
from .windows import batch_rows

__all__ = ["CKPT_NAME", "FULL_DEFAULT_TARGETS", "LOCAL_CKPT", "LORA_DEFAULT_TARGETS", "RecoverConfig", "batch_rows",
           "convert_and_recover", "finetune", "load_teacher", "local_windows", "lr_at", "trained_params", "work_dir",
           "wrap_peft"]
