#!/usr/bin/env bash
# Every GPU figure of convlens in one run (< 8 minutes on one GPU), each section's JSON under $OUT
# (else ./gpu-bench-out):
#   env.json        GPU, CUDA, torch / torchvision / FAISS versions, nvidia-smi
#   extract.json    `convlens extract` img/s on 20,000 JPEGs generated here (real-photo crops, 500x375 to 1600x1200):
#                   --decode gpu (nvJPEG + GPU resize) vs --decode cpu (jpeg-draft) vs --decode cpu --full-decode,
#                   MobileNetV2 (embedded ImageNet weights) bf16, batch 256; model-only rate; nvJPEG vs full-decode
#                   feature difference; peak GPU memory per run
#   occlusion.json  benchmarks/occlusion.py --device cuda (AlexNet, ResNet18, 4 images): convlens vs Captum, outputs checked
#   knn.json        exact kNN graph (k=10, cosine) of 1,000,000 x 1280 random float32: FAISS GPU vs CPU
#                   (CPU time extrapolated from 10,000 queries); skipped unless `faiss.get_num_gpus() > 0`
#   summary.json    the headline ratios, every section's status, the peak GPU memory
#
#   benchmarks/gpu.sh                  # on the GPU machine
#   benchmarks/gpu.sh --device cpu     # dry run on a CPU-only machine: tiny sizes, same code, < 2 minutes
#
# Installs nothing and reaches no network: uses the repo's .venv when present (else python3), the model's
# weights from the installed package, images and vectors made on the spot. A section that fails or times out
# is recorded in its JSON ("status": "failed") and the others still run; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT:-./gpu-bench-out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
BENCH="$PY benchmarks/gpu_bench.py"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/convlens-gpu-bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [ "$DEVICE" = "cpu" ]; then  # dry run: every code path at toy sizes (~1 minute on 2 quiet cores; the
  BUDGET=900                    # limits only stop a hung run, so a loaded machine still finishes green)
  EXTRACT_ARGS=(--n 64 --sizes 500x375,1024x768 --batch-size 32 --num-workers 1 --gen-workers 1 --model-reps 1)
  OCC_ARGS=(--models resnet18 --images 1 --size 64 --window 16 --stride 16 --ppe 4 --batch-size 16)
  KNN_ARGS=(--n 1000 --d 64 --k 10 --cpu-queries 200)
  T_EXTRACT=400 T_OCC=200 T_KNN=200
else
  BUDGET=470
  EXTRACT_ARGS=(--n 20000 --sizes 500x375,640x480,1024x768,1600x1200 --batch-size 256 --model-reps 20)
  OCC_ARGS=(--models alexnet,resnet18 --images 4 --ppe 64,256 --batch-size 256)
  KNN_ARGS=(--n 1000000 --d 1280 --k 10 --cpu-queries 10000 --gpu-block 16384)
  T_EXTRACT=300 T_OCC=120 T_KNN=180
fi
START=$(date +%s)
FAILED=0

run_section() {  # name timeout args...
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -le 5 ]; then
    printf '{"section": "%s", "device": "%s", "status": "failed", "error": "no time left in the %ss budget"}\n' \
      "$name" "$DEVICE" "$BUDGET" > "$OUT_DIR/$name.json"
    FAILED=1; return
  fi
  echo "== $name (limit ${limit}s)" >&2
  timeout --kill-after=10 "$limit" $BENCH "$name" --device "$DEVICE" --out "$OUT_DIR/$name.json" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    printf '{"section": "%s", "device": "%s", "status": "failed", "error": "timed out after %ss"}\n' \
      "$name" "$DEVICE" "$limit" > "$OUT_DIR/$name.json"
  fi
  [ "$rc" -ne 0 ] && FAILED=1
  return 0
}

run_section env 60
if [ "$DEVICE" != "cpu" ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
fi
if ! grep -q '"status": "ok"' "$OUT_DIR/env.json" 2>/dev/null; then
  echo "env check failed (see $OUT_DIR/env.json); use --device cpu on a machine without CUDA" >&2
  exit 1
fi
run_section extract "$T_EXTRACT" "${EXTRACT_ARGS[@]}" --work "$WORK/extract"
run_section occlusion "$T_OCC" -- "${OCC_ARGS[@]}"
run_section knn "$T_KNN" "${KNN_ARGS[@]}"
$BENCH summary --device "$DEVICE" --dir "$OUT_DIR" --out "$OUT_DIR/summary.json" > /dev/null || FAILED=1
echo "wrote $(ls "$OUT_DIR" | tr '\n' ' ')to $OUT_DIR in $(( $(date +%s) - START ))s" >&2
exit "$FAILED"
