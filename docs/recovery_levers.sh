#!/usr/bin/env bash
# The recovery levers of issue 16/26 measured on CPU at small scale (docs/recovery-gpu.md, "Levers"): from one
# starting point (SmolLM2-135M converted at 0.3125 as recipes/smollm2-135m.yaml does, then its layer-local stage),
# 16 distillation steps of 4 x 512 tokens of the recipe's mix each: the shipped settings, lora_lr, all-parameter
# training, the top-k teacher cache; then the cache's speed where windows repeat (8 steps over ~10 windows); then
# distinct text against a small pool seen many times (32 all-parameter steps each).
#
#   docs/recovery_levers.sh START WORK      # START: an export of mla finetune ... local_tokens=65536 (see below)
#
# START was made by:
#   mla convert smollm2-135m CONV --kv-budget 0.3125 --rope-method rotate --factor-method fisher --rank-alloc fisher \
#     --calib brown,pydoc,bbc:business+entertainment+politics+sport --calib-seqs 24 --calib-len 512 --seed 0
#   mla finetune CONV START data=brown,pydoc,bbc:business+entertainment+politics+sport local_tokens=65536 \
#     tokens=512 seq_len=512 batch_size=1          # the layer-local stage, then one step of 1 x 512
set -eu -o pipefail
START=$1 WORK=$2
MLA=${MLA:-mla}
mkdir -p "$WORK"
MIX=brown,pydoc,bbc:business+entertainment+politics+sport
COMMON=(data=$MIX seq_len=512 batch_size=4 tokens=32768 warmup_steps=2 val_data=bbc:tech val_tokens=4096 eval_every=8)
ATTN=q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,input_layernorm,post_attention_layernorm,norm

run() {  # run NAME SETTINGS...: one distillation from START, its log in WORK/NAME.log
    local name=$1
    shift
    [ -f "$WORK/$name/mla_conversion.json" ] || "$MLA" finetune "$START" "$WORK/$name" --overwrite "$@" \
        >"$WORK/$name.log" 2>&1
}

run shipped "${COMMON[@]}"
run lora_lr "${COMMON[@]}" lora_lr=0.001
run all_params "${COMMON[@]}" lora_targets= full_targets=$ATTN,gate_proj,up_proj,down_proj
run topk64 "${COMMON[@]}" teacher_topk=64

# the cache where windows repeat: ~10 windows of 512 of pydoc text, 8 steps of 4 (about 3 passes over each)
python3 -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics.values())[:22000])" >"$WORK/small.txt"
SMALL=(data=$WORK/small.txt seq_len=512 batch_size=4 tokens=16384 val_data=)
run repeat_plain "${SMALL[@]}"
run repeat_topk64 "${SMALL[@]}" teacher_topk=64

# distinct text against repeated text, all-parameter, 32 steps of 4 x 512 (128 window passes): the mix (663 windows,
# none seen twice) against a pool of 12 windows cut from the same three sources (each seen about 11 times)
python3 - "$WORK/pool" <<'EOF'
import random, sys
from pathlib import Path
from convert.data import load_texts
Path(sys.argv[1]).mkdir(exist_ok=True)
for name in ("brown", "pydoc", "bbc:business+entertainment+politics+sport"):
    docs = load_texts(name)
    random.Random(0).shuffle(docs)
    out = []
    while sum(map(len, out)) <= 5600:
        out.append(docs[len(out)])
    (Path(sys.argv[1]) / f"{name.split(':')[0]}.txt").write_text("\n\n".join(out))
EOF
ALL=(seq_len=512 batch_size=4 tokens=65536 warmup_steps=2 val_data=bbc:tech val_tokens=4096 eval_every=8 lora_targets=
     full_targets=$ATTN,gate_proj,up_proj,down_proj)
run distinct "${ALL[@]}" data=$MIX
run pool12 "${ALL[@]}" data=$WORK/pool

python3 - "$WORK" <<'EOF'
import json, re, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| run | training windows | val ratio at step 0 | 8 | 16 | 24 | 32 | trained parameters | distillation tokens/s |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("shipped", "lora_lr", "all_params", "topk64", "repeat_plain", "repeat_topk64", "distinct", "pool12"):
    rec = json.loads((work / name / "mla_conversion.json").read_text())["recovery"]
    ratios = {e["step"]: f"{e['ratio']:.3f}x" for e in rec["val"]}
    rate = re.findall(r"tok_s=(\d+)", (work / f"{name}.log").read_text())
    print(f"| {name} | {rec.get('data_windows', '-')} | " + " | ".join(ratios.get(k, "-") for k in (0, 8, 16, 24, 32))
          + f" | {rec['trainable_parameters'] / 1e6:.1f}M | {rate[-1] if rate else '-'} |")
EOF
