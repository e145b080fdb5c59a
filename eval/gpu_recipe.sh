#!/usr/bin/env bash
# The SmolLM2 GPU recipe whole, timed on a GPU machine (issue 26: "recovered on one GPU in <= 15 minutes"; see
# ../shared/GPU.md: no network, torch preinstalled). recipes/smollm2-135m-gpu.yaml runs verbatim through
# `mla convert SRC OUT --recipe` on a random-weight checkpoint of SmolLM2-135M's shape (eval/bench_convert.py SHAPES;
# the real weights, a 93 MB GGUF, do not fit the device tool's 64 MiB carry). Its perplexity ratio means nothing (the
# teacher is random); its times, tokens/s and memory are the recipe's. A run cut by LIMIT_S still tells how far the
# recipe got (run.log: the progress bars' last lines). Needs .gpu/whl, .gpu/tok and .gpu/downloads (make gpu-prep).
#
#   eval/gpu_recipe.sh                    # results in $OUT (default out/gpu-recipe): run.log, recipe.json
#   PATH=$PWD/.venv/bin:$PATH DEVICE=cpu RECIPE=CUT.yaml WHL=DIR DL=~/.cache/mla-retrofit/downloads SITE=/tmp/s \
#     OUT=/tmp/o MLA_RETROFIT_CACHE=/tmp/c eval/gpu_recipe.sh   # a check of this script on a CPU (CUT: the recipe
#                                                              # with fewer tokens; DIR: one transformers wheel)
set -u -o pipefail
cd "$(dirname "$0")/.."

RECIPE=${RECIPE:-recipes/smollm2-135m-gpu.yaml}
SHAPE=${SHAPE:-smollm2-135m}
DEVICE=${DEVICE:-cuda}
LIMIT_S=${LIMIT_S:-540}
WHL=${WHL:-.gpu/whl} TOK=${TOK:-.gpu/tok} DL=${DL:-.gpu/downloads} SITE=${SITE:-/tmp/site}
OUT=${OUT:-out/gpu-recipe}
export MLA_RETROFIT_CACHE=${MLA_RETROFIT_CACHE:-/tmp/mc} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MC=$MLA_RETROFIT_CACHE
mkdir -p "$OUT" "$MC/downloads"
LOG=$OUT/run.log

say() { echo "$*" | tee -a "$LOG"; }

say "== $(date -u +%FT%TZ) $RECIPE on a random $SHAPE, $DEVICE, limit $LIMIT_S s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
cp -r "$DL"/. "$MC/downloads/"  # the corpora as downloaded: fetch verifies them and never goes online
python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHL"/*.whl >>"$LOG" 2>&1 || { say "install failed"; exit 1; }
export PYTHONPATH=$SITE:$PWD
python3 -c "import sys; from convert.cache import cache_dir; from eval.bench_convert import write_random_checkpoint; \
write_random_checkpoint(sys.argv[1], cache_dir('shapes') / sys.argv[1], sys.argv[2])" "$SHAPE" "$TOK" >>"$LOG" 2>&1 \
    || { say "random checkpoint failed"; exit 1; }

# the recipe verbatim (its convert: and recover: sections), on the device: mla convert picks CUDA by itself (auto)
t0=$SECONDS
timeout --kill-after=15 "$LIMIT_S" python3 -m convert.cli convert "$MC/shapes/$SHAPE" "$MC/recovered" \
    --recipe "$RECIPE" --overwrite --device "$DEVICE" >>"$LOG" 2>&1
rc=$?
say "== mla convert --recipe $RECIPE: exit $rc after $((SECONDS - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (cut by LIMIT_S)')"
python3 - "$MC/recovered/mla_conversion.json" "$OUT/recipe.json" "$((SECONDS - t0))" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
path, out, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if not path.exists():
    sys.exit("no export: see run.log for how far the recipe got")
record = json.loads(path.read_text())
rec = record["recovery"]
tokens = rec["tokens_seen"]
local_s = round((rec["local"] or {}).get("elapsed_s", 0))
result = {"wall_s": wall, "recovery_s": rec["elapsed_s"], "local_s": local_s,
          "tokens": tokens, "steps": rec["steps"], "data_windows": rec.get("data_windows"),
          "memory": rec["memory"], "trainable_parameters": rec["trainable_parameters"],
          "val": rec["val"], "versions": record.get("versions")}
out.write_text(json.dumps(result, indent=1) + "\n")
print(f"RECIPE wall {wall} s (conversion {wall - rec['elapsed_s']:.0f} s, recovery {rec['elapsed_s']:.0f} s of which "
      f"layer-local {local_s} s); {tokens} distillation tokens; memory {rec['memory']}")
EOF
say "== done at ${SECONDS} s"
