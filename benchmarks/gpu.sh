#!/usr/bin/env bash
# The GPU runbook: baton measured on one GPU in at most 8 minutes wall, start-up included.
#
#   bash benchmarks/gpu.sh --out runs/gpu          # on a machine with one CUDA GPU
#   bash benchmarks/gpu.sh --smoke --out DIR       # the same code paths on the CPU, tiny models, seconds
#
# First the GPU smoke tests (tests/test_gpu_paths.py: bf16 autocast, FSDP2 mixed precision, DeepSpeed
# on CUDA, uint8 hand-off + on-device normalisation, fp16 with GradScaler, decode_on_device on nvJPEG;
# skipped without CUDA), then each part of benchmarks/gpu_bench.py under its own hard time limit
# (`timeout`; what a part finished before its limit is kept, the JSON says which part timed out),
# then OUT/gpu.json and the Markdown table OUT/gpu.md (benchmarks/gpu_report.py).
# Python: $PYTHON, else .venv/bin/python, else python3. Nothing is downloaded; open_clip models are
# built by name with random weights.
set -u
cd "$(dirname "$0")/.."
OUT=runs/gpu
SMOKE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --smoke) SMOKE="--smoke"; shift ;;
    *) echo "usage: bash benchmarks/gpu.sh [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PARTS_DIR="$OUT/parts"; WORK="$OUT/work"
rm -rf "$PARTS_DIR" "$WORK"; mkdir -p "$PARTS_DIR" "$WORK"
START=$(date +%s)
# Total budget and each part's limit (seconds), in the order they run: the most wanted first, so
# that a slow part only ever cuts what comes after it. The report needs ~10 s at the end.
if [ -n "$SMOKE" ]; then
  TOTAL=${GPU_SH_TOTAL_S:-600}
  PARTS="tests:60 clip_synthetic:120 clip_shards:120 decode:60 dino:60 faiss:60 open_clip_train:180 clip_compile:120"
else
  TOTAL=${GPU_SH_TOTAL_S:-470}
  PARTS="tests:70 clip_synthetic:75 clip_shards:80 decode:25 dino:30 faiss:30 open_clip_train:90 clip_compile:150"
fi
RESERVE=10
# GPU_SH_SCALE=N multiplies every limit and the total (a loaded CPU box running --smoke; default 1).
SCALE=${GPU_SH_SCALE:-1}
TOTAL=$(( TOTAL * SCALE ))

for entry in $PARTS; do
  part="${entry%%:*}"; limit=$(( ${entry##*:} * SCALE ))
  left=$(( TOTAL - RESERVE - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  status="$PARTS_DIR/$part.status.json"
  if [ "$limit" -lt 5 ]; then
    echo "{\"part\": \"$part\", \"rc\": null, \"limit_s\": $limit, \"wall_s\": 0, \"skipped\": \"no time left in the ${TOTAL} s budget\"}" > "$status"
    echo "== $part: skipped, no time left"; continue
  fi
  echo "== $part (limit ${limit} s)"
  t0=$(date +%s)
  if [ "$part" = tests ]; then
    timeout --kill-after=5 "$limit" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_paths.py \
      --junitxml="$PARTS_DIR/tests.xml" > "$PARTS_DIR/$part.log" 2>&1
  else
    timeout --kill-after=5 "$limit" "$PY" benchmarks/gpu_bench.py "$part" --out "$PARTS_DIR" --work "$WORK" $SMOKE \
      > "$PARTS_DIR/$part.log" 2>&1
  fi
  rc=$?
  wall=$(( $(date +%s) - t0 ))
  echo "{\"part\": \"$part\", \"rc\": $rc, \"limit_s\": $limit, \"wall_s\": $wall, \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)}" > "$status"
  echo "   rc $rc in ${wall} s"; tail -n 3 "$PARTS_DIR/$part.log" | sed 's/^/   /'
done

"$PY" benchmarks/gpu_report.py --out "$OUT" $SMOKE --wall-s $(( $(date +%s) - START ))
rc=$?
rm -rf "$WORK"
exit $rc
