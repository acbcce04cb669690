#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one bounded run (a few minutes on an H100/H200):
#   1. the search UI under load (benchmarks/app_load.py)          needs gradio + faiss
#   2. the CUDA-only tests (host-sync freedom, GPU augmentation)   needs pytest, pytorch-metric-learning
#   3. training-step throughput of every Metrix level, bf16, batch 120 (the anchors' setting)
#   4. the same for the contrastive loss in fp32 at batch 100 (the official code's setting)
#   5. the input pipeline against synthetic tensors
#   6. an end-to-end GPU training run: prepare the cache, train ResNet-50 two epochs, evaluate
#
#   bash benchmarks/gpu_checks.sh LOG_DIR
#
# Each step has its own time limit and writes LOG_DIR/<step>.log; a failed or timed-out step is
# reported and the next one still runs. SCALE=small runs every step at toy sizes (a CPU dry run).
set -u
LOG_DIR=${1:?usage: gpu_checks.sh LOG_DIR}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python3}
SCALE=${SCALE:-full}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
cd "$(dirname "$0")/.."

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOG_DIR/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
}

retrieval() { "$PY" -c 'import sys; from retrieval.cli import main; sys.argv[0] = "retrieval"; main()' "$@"; }

if [ "$SCALE" = small ]; then
    APP="--arch resnet18 --image-size 64 --embedding-size 32 --queries 2 --clients 4"
    STEP="--arch resnet18 --size 64 --batch 16 --steps 2 --warmup 1"
    PIPE="--arch resnet18 --image-size 64 --images 64 --batch-size 16 --steps 2 --warmup 1 --rounds 1"
    TRAIN="--arch resnet18 --image-size 64 --resize-size 73 --embedding-size 32 --epochs 1 --max-steps-per-epoch 3"
else
    APP="--clients 16 --queries 5"
    STEP="--batch 120 --steps 15 --warmup 3"
    PIPE=""
    TRAIN="--arch resnet50 --image-size 224 --epochs 2"
fi

nvidia-smi -L 2>/dev/null
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

step app_load 130 "$PY" benchmarks/app_load.py $APP
step cuda_tests 75 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_metrix.py tests/test_gpu_augment.py tests/test_gpu_decode.py
step train_step_bf16 140 "$PY" benchmarks/train_step.py $STEP --loss all --rounds 2 --check-sync
step train_step_fp32_contrastive 60 "$PY" benchmarks/train_step.py $STEP --loss contrastive --precision fp32 \
    --batch 100 --rounds 1
step input_pipeline 100 "$PY" benchmarks/input_pipeline.py $PIPE --rounds 2
step train_e2e 75 bash -c "$(declare -f retrieval); PY=$PY
    retrieval prepare --dataset demo --data-root $WORK/demo --workers 8 &&
    retrieval train --dataset demo --data-root $WORK/demo --cache $WORK/demo/.metrix-cache \
        --pretrained none $TRAIN --out $WORK/run --eval-every 1 --workers 4 &&
    cp $WORK/run/metrics.jsonl $WORK/run/summary.json $LOG_DIR/ 2>/dev/null; ls -la $WORK/run"
rm -rf "$WORK"
