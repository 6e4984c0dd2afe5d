#!/usr/bin/env bash
# Runs the model benchmark on the Sapphire Rapids host (../shared/device/README.md) and writes
# its JSON lines into OUT_DIR. Run from anywhere inside the checkout, after the TensorFlow
# install from the shared recipe (install_tf.sh -> /tmp/site):
#
#     export PYTHONPATH=/tmp/site       # or any folder/venv where python3 finds TensorFlow
#     bash bench/spr.sh OUT_DIR         # about 3-5 minutes on 16 SPR cores
#
# tf_bf16 is not pip-installed there: its pip layout maps transforms/ and kernels/ into the
# tf_bf16 package, so a staged copy of the sources is put first on PYTHONPATH. Knobs (env):
# PYTHON (python3), THREADS (16), BATCHES (1,32), RUNS (20), WARMUP (5), MODELS, VARIANTS,
# TRACE (1: also write per-op-type step-stats splits at batch 1 and 32), TIME_LIMIT (seconds per
# python step, 420).
set -euo pipefail

out=${1:?usage: bash bench/spr.sh OUT_DIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
threads=${THREADS:-16}
batches=${BATCHES:-1,32}
runs=${RUNS:-20}
warmup=${WARMUP:-5}
models=${MODELS:-resnet50,mobilenetv2,bert_base}
variants=${VARIANTS:-fp32,fp32_cleaned,tf_amp,tf_amp_runtime,tf_bf16,tf_bf16_int8,tf_bf16_int8_kernels,tf_bf16_kernels,inc,inc_int8}
limit=${TIME_LIMIT:-420}

stage=$(mktemp -d "${TMPDIR:-/tmp}/tf_bf16_bench.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp -r "$root/tf_bf16" "$stage/tf_bf16"
rm -rf "$stage/tf_bf16/transforms" "$stage/tf_bf16/kernels"
cp -r "$root/transforms" "$stage/tf_bf16/transforms"
cp -r "$root/kernels" "$stage/tf_bf16/kernels"
cp -r "$root/bench" "$root/tests" "$stage/"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +

export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export TF_ENABLE_ONEDNN_OPTS=1
cd "$stage"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  grep -m1 'model name' /proc/cpuinfo || true
  echo "nproc: $(nproc)"
  echo "bf16 flags: $(grep -m1 -o -w -E 'avx512_bf16|amx_bf16|amx_int8|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)"
  echo "python: $($py --version 2>&1)"
  $py -c "import tensorflow as tf, keras, numpy; print('tensorflow', tf.__version__, 'keras', keras.__version__, 'numpy', numpy.__version__)" 2>/dev/null
  echo "command: bench.models --threads=$threads --batches=$batches --runs=$runs --warmup=$warmup --models=$models --variants=$variants"
} > "$out/host.txt" 2>&1
cat "$out/host.txt"

trace_args=()
if [ "${TRACE:-1}" = "1" ]; then
  trace_args=(--trace_out="$out/op_profile.jsonl" --trace_batches="$batches" --trace_runs=3)
fi
start=$SECONDS
timeout "$limit" "$py" -m bench.models --threads="$threads" --batches="$batches" --runs="$runs" \
  --warmup="$warmup" --models="$models" --variants="$variants" --out="$out/models.jsonl" \
  "${trace_args[@]}" 2> "$out/models.log"
echo "bench.models finished in $((SECONDS - start)) s; results in $out/models.jsonl"
