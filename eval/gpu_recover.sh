#!/usr/bin/env bash
# Recovery on a GPU machine (issue 26; see ../shared/GPU.md: no network, torch preinstalled). Needs, in the checkout:
# .gpu/whl/*.whl (transformers, installed into /tmp/site) and .gpu/tok (tokenizer files), from `make gpu-prep`.
# 1. tiny random models of three families converted and recovered on cuda (every stage there, bf16, frozen bf16);
# 2. bench-convert of the Llama-3.2-1B shape on cuda (random weights, --kv-budget 0.25);
# 3. mla finetune of that export with recipes/gpu-1b-8b.yaml, cut to its first steps (a short layer-local stage,
#    STEPS optimizer steps of 8 x 1024): its record holds the memory estimate and the measured CUDA peak;
# 4. the 8B-shape estimate for the same settings (tools/recover_memory.py), beside the 1B one.
# Results go into $OUT as they come (run.log, recover-1b.json, estimate.txt).
#
#   eval/gpu_recover.sh                    # the whole check, no step started after BUDGET_S seconds
#   PATH=$PWD/.venv/bin:$PATH SHAPE=tiny-llama DEVICE=cpu SEQ=64 WHL=DIR TOK=TINY SITE=/tmp/s OUT=/tmp/o \
#     MLA_RETROFIT_CACHE=/tmp/c eval/gpu_recover.sh   # a check of this script on a CPU (DIR: one transformers
#                                                     # wheel; TINY: a tokenizer of at most 512 tokens)
set -u -o pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-420}
SHAPE=${SHAPE:-llama-3.2-1b}
DEVICE=${DEVICE:-cuda}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-8}
WHL=${WHL:-.gpu/whl} TOK=${TOK:-.gpu/tok} SITE=${SITE:-/tmp/site}
OUT=${OUT:-out/gpu-recover}
export MLA_RETROFIT_CACHE=${MLA_RETROFIT_CACHE:-/tmp/mc} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MC=$MLA_RETROFIT_CACHE
mkdir -p "$OUT" "$MC"
LOG=$OUT/run.log

say() { echo "$*" | tee -a "$LOG"; }

step() {  # step NAME MIN_S CAP_S CMD...: CMD under timeout min(CAP_S, seconds left); skipped under MIN_S left
    local name=$1 min=$2 cap=$3 left t0 rc
    shift 3
    left=$((BUDGET_S - SECONDS))
    if ((left < min)); then
        say "== $name: skipped, ${left} s left"
        return 3
    fi
    ((left > cap)) && left=$cap
    say "== $name (at ${SECONDS} s, timeout ${left} s): $*"
    t0=$SECONDS
    timeout --kill-after=15 "$left" "$@" >>"$LOG" 2>&1
    rc=$?
    say "== $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
    return $rc
}

say "== $(date -u +%FT%TZ) shape $SHAPE on $DEVICE, budget $BUDGET_S s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
step install 0 60 python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHL"/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD
MLA=(python3 -m convert.cli)

# 1. tiny random models of three families (the tokenizer of $TOK), converted and recovered on the device with both
#    layer-local inputs: every stage on it (the CPU suite's device audit, here for real); the text files of step 3
step "tiny stages on $DEVICE" 30 150 python3 - "$DEVICE" "$MC/tiny" "$TOK" <<'EOF'
import sys
from pathlib import Path

import pydoc_data.topics
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from convert.config import ConvertConfig
from convert.pipeline import convert
from convert.recover import finetune
from convert.recover.config import RecoverConfig

device, root, tok = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
topics = list(pydoc_data.topics.topics.values())
root.mkdir(parents=True, exist_ok=True)
(root / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
(root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
tokenizer = AutoTokenizer.from_pretrained(tok)
extra = {"gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                             query_pre_attn_scalar=16)}
for family in ("llama", "qwen3", "gemma3_text"):
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, **extra.get(family, {}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
    tokenizer.save_pretrained(root / family)
    convert(str(root / family), root / f"{family}-conv", ConvertConfig(kv_budget=0.25, calib="pydoc", calib_seqs=4,
            calib_len=64, device=device, overwrite=True))
    for inputs in ("teacher", "student"):
        cfg = RecoverConfig(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=4,
                            tokens=1024, val_tokens=256, local_tokens=512, local_inputs=inputs, device=device)
        rec = finetune(root / f"{family}-conv", root / f"{family}-rec", cfg, overwrite=True, restart=True)["recovery"]
        print(f"TINY {family} {inputs}: ratio {rec['val'][0]['ratio']:.4f} -> {rec['val'][-1]['ratio']:.4f}, "
              f"memory {rec['memory']}")
EOF

# 2. the 1B shape, converted on the device
step "$SHAPE convert" 60 200 "${MLA[@]}" bench-convert "$SHAPE" --tokenizer "$TOK" --out "$MC/conv-$SHAPE" \
    --overwrite -- --kv-budget 0.25 --calib pydoc --calib-seqs 4 --calib-len 256 --device "$DEVICE"

# 3. its recovery's first steps with the 1B-8B recipe
if [ -f "$MC/conv-$SHAPE/mla_conversion.json" ]; then
    step "$SHAPE finetune" 60 300 "${MLA[@]}" finetune "$MC/conv-$SHAPE" "$MC/rec-$SHAPE" --overwrite --restart \
        --recipe recipes/gpu-1b-8b.yaml data="$MC/tiny/train.txt" val_data="$MC/tiny/val.txt" \
        val_tokens=$((4 * SEQ)) seq_len=$SEQ \
        tokens=$((STEPS * 8 * SEQ)) local_tokens=$((16 * SEQ)) eval_every=$STEPS checkpoint_every=$STEPS \
        device=$DEVICE
    python3 -c "import json; r = json.load(open('$MC/rec-$SHAPE/mla_conversion.json'))['recovery']; \
json.dump({k: r[k] for k in ('memory', 'val', 'local', 'elapsed_s', 'trainable_parameters', 'history')}, \
open('$OUT/recover-1b.json', 'w'), indent=1); print('RECOVER', r['memory'], r['elapsed_s'])" 2>&1 | tee -a "$LOG"
fi

# 4. the estimates for the 1B shape (to set beside its measured peak) and the 8B shape
for shape in llama-3.2-1b llama-3.1-8b; do
    python3 tools/recover_memory.py "$shape" --recipe recipes/gpu-1b-8b.yaml seq_len=$SEQ 2>/dev/null | tee -a "$OUT/estimate.txt"
done
say "== done at ${SECONDS} s"
