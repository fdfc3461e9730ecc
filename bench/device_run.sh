#!/usr/bin/env bash
# The prepared job for the lent GPU (15 minutes of device time per session, start-up included), from the
# repository root there, after `bench/device_suite.py prepare` here (its inputs travel as out/device):
#   1. GetIK on the GPU: checker, latency by stage, box goals, batch throughput (device_suite.py run);
#      meanwhile the CPU generates the 2048-point shape datasets;
#   2. the paper-size shape VAE and CVAE (2048 points), trained together until TOTAL_S minus the
#      shape part, written as mace_ros/core/data/shape_{vae,cvae}_2048.safetensors;
#   3. ShapeEngine's MACE iteration time with the new VAE (device_suite.py shape-speed).
# Everything lands in OUT_DIR (at most 8 files come back): run.log, suite.json, shape_speed.json,
# train_{vae,cvae}.log and one tar per model (weights + metadata).
#   bash bench/device_run.sh "$OUT"
# DEVICE, TOTAL_S, SUITE_ARGS, TRAIN_ARGS and SHAPE_ARGS override the defaults (a CPU smoke test uses tiny sizes).
# The device's image has torch, scipy, PyYAML and safetensors but not trimesh (the shape datasets need
# it): download its wheel here first, into .whl (ignored; pass carry [".whl", "out/device"]):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trimesh==5.2.0
set -uo pipefail
out=${1:?usage: bench/device_run.sh OUT_DIR}
device=${DEVICE:-cuda}
total_s=${TOTAL_S:-560}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
log=$out/run.log
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"; } >>"$log" 2>&1

# The datasets both trainings read, generated once (the two runs would race on the cache).
python3 -c "
from mace_ros.core.shape.training import DATA_CACHE_DIR, VALIDATION_OBJECTS, load_or_generate
from mace_ros.core.shape.datasets import HELD_OUT_FAMILY, TRAINING_FAMILIES
import sys
objects, points = (int(v) for v in sys.argv[1:3])
load_or_generate('tabletop', objects + VALIDATION_OBJECTS, points, 0, TRAINING_FAMILIES, DATA_CACHE_DIR)
load_or_generate('tabletop', VALIDATION_OBJECTS, points, 1, (HELD_OUT_FAMILY,), DATA_CACHE_DIR)
print('datasets ready')
" "${DATASET_OBJECTS:-10000}" "${DATASET_POINTS:-2048}" >>"$log" 2>&1 &
datasets=$!

timeout $((total_s / 2)) python3 bench/device_suite.py run --device "$device" --budget-s $((total_s * 2 / 5)) \
  --out "$out/suite.json" ${SUITE_ARGS:-} >>"$log" 2>&1
echo "suite exit $? at ${SECONDS} s" >>"$log"
wait $datasets

shape_s=60
train_s=$((total_s - SECONDS - shape_s - 20))
minutes=$(python3 -c "print(max(($train_s - 15) / 60, 0.1))")
echo "training for ${minutes} min from ${SECONDS} s" >>"$log"
for model in vae cvae; do
  timeout $((train_s + 10)) python3 -m mace_ros.core.shape.training --model $model --dataset tabletop --device "$device" \
    --max-minutes "$minutes" --out mace_ros/core/data/shape_${model}_2048.safetensors ${TRAIN_ARGS:-} >"$out/train_$model.log" 2>&1 &
done
wait
echo "training done at ${SECONDS} s" >>"$log"
for model in vae cvae; do
  (cd mace_ros/core/data && tar cf "$out/shape_${model}_2048.tar" shape_${model}_2048.safetensors shape_${model}_2048.json) >>"$log" 2>&1
done

timeout $((total_s - SECONDS > 10 ? total_s - SECONDS : 10)) python3 bench/device_suite.py shape-speed --device "$device" \
  --weights mace_ros/core/data/shape_vae_2048.safetensors --budget-s $((total_s - SECONDS - 15)) --out "$out/shape_speed.json" \
  ${SHAPE_ARGS:-} >>"$log" 2>&1
echo "all done at ${SECONDS} s" >>"$log"
