#!/usr/bin/env bash
# Decode benchmark of random-weight Llama shapes on a GPU machine (see /work/shared/GPU.md: no network, torch
# preinstalled). Needs, in the checkout: .gpu/whl/*.whl (transformers, installed into /tmp/site) and .gpu/tok (the
# tokenizer files for bench-convert --tokenizer). For each shape: bench-convert on cuda (--kv-budget 0.25), then
# mla bench of the export against the random source at batch 1,16 x context 8192 eager (the absorbed decode on
# batched matmuls, the GPU default, then as one SDPA call: --absorbed sdpa) and --capacity at 8192; then, for each
# shape, the same batches with --compile. Results go into $OUT as they come (8 files at most: run.log with the
# conversion records, eager, capacity and compile JSONs per shape, and the sdpa one of SDPA_SHAPES); a compact table
# is printed at the end.
#
#   eval/gpu_bench.sh                                  # both shapes, no step started after BUDGET_S seconds
#   SHAPES=llama-3.1-8b BUDGET_S=560 eval/gpu_bench.sh # one shape, a longer budget
#   PATH=$PWD/.venv/bin:$PATH SHAPES=tiny-llama CONVERT_ARGS="--calib pydoc --calib-seqs 4 --calib-len 64" \
#     CONTEXT=64 BATCHES=1,2 CAP_MAX_BATCH=4 WHL=DIR TOK=TINY SITE=/tmp/s OUT=/tmp/o MLA_RETROFIT_CACHE=/tmp/c \
#     eval/gpu_bench.sh   # a check of this script on a CPU (3 minutes): DIR holds one transformers wheel, TINY a
#                         # tokenizer of at most 512 tokens (a model folder of tests/conftest.py's make_tiny)
#
# Every step runs under `timeout` (what is left of BUDGET_S, at most its own cap); a step that would start with less
# than its minimum left is skipped. mla bench rewrites its JSON after every run, so a step cut short keeps what it
# measured. The 8B checkpoint and export are deleted after use (64 GiB disk).
set -u -o pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-470}                       # the whole run, seconds (under 8 minutes)
SHAPES=${SHAPES:-"llama-3.2-1b llama-3.1-8b"}
CONTEXT=${CONTEXT:-8192}
BATCHES=${BATCHES:-1,16}
CAP_MAX_BATCH=${CAP_MAX_BATCH:-1024}            # --max-batch of the capacity search
SDPA_SHAPES=${SDPA_SHAPES:-llama-3.2-1b}        # also --absorbed sdpa (latent widths near 256: flash may apply)
CONVERT_ARGS=${CONVERT_ARGS:-"--kv-budget 0.25 --calib pydoc --device cuda"}
WHL=${WHL:-.gpu/whl} TOK=${TOK:-.gpu/tok} SITE=${SITE:-/tmp/site}   # (other values: a check of this script on a CPU)
OUT=${OUT:-out/gpu-bench}
export MLA_RETROFIT_CACHE=${MLA_RETROFIT_CACHE:-/tmp/mc} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MC=$MLA_RETROFIT_CACHE
mkdir -p "$OUT" "$MC"
LOG=$OUT/run.log

say() { echo "$*" | tee -a "$LOG"; }

# step NAME MIN_S CAP_S CMD...: CMD under timeout min(CAP_S, seconds left), its output into the log; skipped
# (status 3) when fewer than MIN_S seconds are left.
step() {
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

say "== $(date -u +%FT%TZ) shapes: $SHAPES, batch $BATCHES x context $CONTEXT, budget $BUDGET_S s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
step install 0 60 python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHL"/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, torch.cuda.get_device_name())' >>"$LOG" 2>&1

MLA=(python3 -m convert.cli)
bench_of() {  # the mla bench command line of a shape's export against its random source
    echo "${MLA[*]}" bench "$MC/bench/$1-mla" --baseline "$MC/shapes/$1" --context "$CONTEXT"
}
# Phase 1, every shape: convert, eager decode at each batch, capacity (cheap: one process per model, the cache
# filled with random tokens); phase 2, every shape: the compiled decode (the dearest: compiling and CUDA graphs).
for shape in $SHAPES; do
    case $shape in *8b) conv_min=200 conv_cap=300 ;; *) conv_min=60 conv_cap=150 ;; esac  # 8B: 165 s measured
    step "$shape convert" "$conv_min" "$conv_cap" "${MLA[@]}" bench-convert "$shape" --tokenizer "$TOK" \
        --json "$MC/convert-$shape.json" -- $CONVERT_ARGS && cat "$MC/convert-$shape.json" >>"$LOG"
    [ -f "$MC/bench/$shape-mla/mla_conversion.json" ] || continue
    step "$shape eager" 60 150 $(bench_of "$shape") --batch "$BATCHES" --runs 2 --new-tokens 16 \
        --json "$OUT/$shape-eager.json"
    [[ " $SDPA_SHAPES " == *" $shape "* ]] && step "$shape eager sdpa" 60 120 $(bench_of "$shape") --batch "$BATCHES" --runs 2 --new-tokens 16 \
        --absorbed sdpa --json "$OUT/$shape-sdpa.json"
    step "$shape capacity" 45 150 $(bench_of "$shape") --capacity --max-batch "$CAP_MAX_BATCH" --runs 1 \
        --new-tokens 8 --json "$OUT/$shape-capacity.json"
done
for shape in $SHAPES; do
    [ -f "$MC/bench/$shape-mla/mla_conversion.json" ] || continue
    step "$shape compile" 90 200 $(bench_of "$shape") --batch "$BATCHES" --compile --runs 2 --new-tokens 16 \
        --json "$OUT/$shape-compile.json"
done
for shape in $SHAPES; do
    case $shape in *8b) rm -rf "$MC/shapes/$shape" "$MC/bench/$shape-mla" && say "== removed the $shape files" ;; esac
done

python3 - "$OUT" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path

BW = 4.3e12  # bytes/s, H200 memory: a decode step reads the weights and the cache at least once (its floor)


def cell(r, key, spec):
    ratio = r.get("vs_original", {}).get(key)
    return "-" if r.get(key) is None else spec.format(r[key]) + (f" ({ratio:.2f}x)" if ratio else "")


print(f"{'run':<26}{'batch x ctx':>12}  {'model':<20}{'decode tok/s':>18}{'ms/step':>9}{'floor ms':>9}"
      f"{'KV MiB':>16}{'peak MiB':>10}{'kernels/layer':>16}")
KINDS = ("eager", "sdpa", "compile", "capacity")
runs = [p for p in Path(sys.argv[1]).glob("*-*.json") if p.stem.rsplit("-", 1)[-1] in KINDS]
for path in sorted(runs, key=lambda p: (p.stem.rsplit("-", 1)[0], KINDS.index(p.stem.rsplit("-", 1)[-1]))):
    res = json.loads(path.read_text())
    for block in res.get("pairs", []) + res.get("capacity", []):
        ctx = block["context"]
        for r in block["models"]:
            name = r["name"] + (f" max {r['max_batch']}" if "probes" in r else "")
            if "decode_tok_s" not in r:
                probes = ", ".join(f"{p['batch']} {'ok' if p['fits'] else 'no'}" for p in r.get("probes", []))
                print(f"{path.stem:<26}{'-':>12}  {name[:20]:<20} no measurement (probes: {probes})")
                continue
            b = r["batch"]
            floor = 1000 * (r["weights_mib"] + r["kv_cache_mib"]) * 2**20 / BW
            print(f"{path.stem:<26}{f'{b} x {ctx}':>12}  {name[:20]:<20}{cell(r, 'decode_tok_s', '{:.0f}'):>18}"
                  f"{1000 * b / r['decode_tok_s']:>9.3g}{floor:>9.3g}{cell(r, 'kv_cache_mib', '{:.4g}'):>16}"
                  f"{r['peak_memory_mib']:>10.0f}{cell(r, 'kernels_per_layer', '{:.1f}'):>16}")
EOF
say "== done at ${SECONDS} s"
