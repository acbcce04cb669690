#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one bounded run (a few minutes on an H100/H200):
#   app_load                   the search UI under load (benchmarks/app_load.py)    needs gradio + faiss
#   cuda_tests                 every test that needs a CUDA GPU (CUDA_TESTS below): host-sync freedom, fused
#                              pooling, GPU augmentation, graph replay and its eager fall-back
#   train_step_pool            multi-similarity step: fused feature pooling vs the PyTorch path
#   train_step_modes           eager, compiled loss, whole-step CUDA graphs and both, side by side
#   train_step_all             every loss, bf16, batch 120 (the anchors' setting)
#   train_step_fp32            contrastive in fp32 at batch 100 (the official code's setting)
#   input_pipeline             the input pipeline against synthetic tensors
#   train_e2e                  prepare the cache, train ResNet-50 two epochs on the demo with --cuda-graphs, evaluate
#   recipe_time                the full CUB MS + feature-Metrix recipe's wall time (and the plain one), extrapolated
#
#   bash benchmarks/gpu_checks.sh LOG_DIR                      # every step
#   ONLY="app_load cuda_tests" bash benchmarks/gpu_checks.sh LOG_DIR
#
# Each step has its own time limit and writes LOG_DIR/<step>.log; a failed or timed-out step is
# reported and the next one still runs. At the end, any step whose log shows a fall-back (the CUDA graph
# or the fused pooling kernels giving way to the eager / PyTorch path) is listed: those paths did not run.
# SCALE=small runs every step at toy sizes (a CPU dry run).
set -u
STEPS="app_load cuda_tests train_step_pool train_step_modes train_step_all train_step_fp32 input_pipeline train_e2e recipe_time"
LOG_DIR=${1:?usage: gpu_checks.sh LOG_DIR}
ONLY=${ONLY:-}
for name in $ONLY; do
    if [[ " $STEPS " != *" $name "* ]]; then
        echo "gpu_checks.sh: unknown step '$name' in ONLY; the steps are: $STEPS" >&2
        exit 2
    fi
done
mkdir -p "$LOG_DIR" && LOG_DIR=$(cd "$LOG_DIR" && pwd)  # absolute: the steps run from the repository root
PY=${PYTHON:-python3}
SCALE=${SCALE:-full}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
cd "$(dirname "$0")/.."

# The tests that need a CUDA GPU (each skips on a CPU), by node id: a renamed or removed test makes this
# step fail ("not found") instead of being silently deselected. tests/test_gpu_checks.py checks that the
# list names every such test in tests/ and nothing else.
CUDA_TESTS=(
    tests/test_fused_pool.py::test_fused_path_is_off_on_cpu_and_under_deterministic_algorithms
    tests/test_fused_pool.py::test_fused_pooling_on_cuda_in_bfloat16_matches_float32_mixing
    tests/test_fused_pool.py::test_fused_pooling_addresses_more_than_2_31_pooled_values
    tests/test_gpu_augment.py::test_runs_on_cuda_when_available
    tests/test_metrix.py::test_step_never_synchronises_with_the_host
    tests/test_step.py::test_graph_replay_equals_eager_loss_and_weights
    tests/test_step.py::test_every_replay_draws_fresh_pairs_and_lam
    tests/test_step.py::test_graph_replay_never_synchronises_with_the_host
    tests/test_step.py::test_capturable_adam_state_equals_eager_adam_after_steps
    tests/test_step.py::test_a_smaller_last_batch_runs_eagerly_and_replays_continue
    tests/test_step.py::test_a_capture_that_breaks_the_graph_rules_falls_back_to_eager_training
    tests/test_step.py::test_capture_succeeds_while_another_thread_allocates_pinned_memory
    tests/test_step.py::test_warm_up_and_capture_share_one_side_stream
)

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
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
    RECIPE="--scale 0.02 --image-size 64 --arch resnet18 --full-epochs 1 --train-arg=--warmup-epochs=1"
else
    APP="--clients 16 --queries 5"
    STEP="--batch 120 --steps 15 --warmup 3"
    PIPE=""
    TRAIN="--arch resnet50 --image-size 224 --epochs 2"
    RECIPE=""
fi

nvidia-smi -L 2>/dev/null
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

step app_load 110 "$PY" benchmarks/app_load.py $APP
# -v names each test as it starts, so a timeout shows which one hung; --durations shows where the time went
step cuda_tests 300 "$PY" -m pytest -v -rs --durations=0 -p no:cacheprovider "${CUDA_TESTS[@]}"
step train_step_pool 60 "$PY" benchmarks/train_step.py $STEP --loss ms --rounds 2 --check-sync \
    --levels none,embedding,feature,feature:torch
step train_step_modes 150 "$PY" benchmarks/train_step.py $STEP --loss ms --rounds 2 --check-sync \
    --levels none,embedding,feature --modes eager,compiled,graphs,both
step train_step_all 60 "$PY" benchmarks/train_step.py $STEP --loss all --rounds 1 --levels none,embedding,feature,input
step train_step_fp32 60 "$PY" benchmarks/train_step.py $STEP --loss contrastive --precision fp32 --batch 100 --rounds 1
step input_pipeline 100 "$PY" benchmarks/input_pipeline.py $PIPE --rounds 2
step train_e2e 75 bash -c "$(declare -f retrieval); PY=$PY
    retrieval prepare --dataset demo --data-root $WORK/demo --workers 8 &&
    retrieval train --dataset demo --data-root $WORK/demo --cache $WORK/demo/.metrix-cache \
        --pretrained none $TRAIN --cuda-graphs --out $WORK/run --eval-every 1 --workers 4 &&
    cp $WORK/run/metrics.jsonl $WORK/run/summary.json $LOG_DIR/ 2>/dev/null; ls -la $WORK/run"
step recipe_time 300 "$PY" benchmarks/recipe_time.py $RECIPE
rm -rf "$WORK"

fallbacks=$(grep -l -e "the CUDA graph .* failed" -e "fused Metrix pooling kernels cannot run" "$LOG_DIR"/*.log 2>/dev/null)
if [ -n "$fallbacks" ]; then
    echo "=== fall-backs: these logs show the CUDA graph or the fused pooling kernels giving way (grep 'failed' / 'cannot run'):"
    echo "$fallbacks"
fi
