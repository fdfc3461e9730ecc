#!/usr/bin/env bash
# The prepared job for the lent GPU (15 minutes of device time per session, start-up included), from the
# repository root there, after `bench/device_suite.py prepare` here (its inputs travel as out/device).
# STEPS picks what runs, in this order (default: tests suite shape-speed):
#   tests        the CUDA-only tests (test/test_cuda_graph.py: graph capture, replay, MACE and the checker);
#   suite        GetIK on the GPU: checker, latency by stage, box goals, batch throughput, torch profiles
#                (device_suite.py run), then the latency section again with the checker's CUDA graphs off;
#   train        the paper-size shape VAE and CVAE (2048 points), trained together for what TOTAL_S leaves,
#                written as mace_ros/core/data/shape_{vae,cvae}_2048.safetensors (+ one tar each in OUT_DIR);
#   shape-speed  ShapeEngine's MACE iteration time (device_suite.py shape-speed).
# Everything lands in OUT_DIR (at most 8 files come back): run.log, tests.log, suite.json (+ .profile.txt,
# .batch_profile.txt), suite_eager.json, shape_speed.json (+ .profile.txt); train_{vae,cvae}.log and the tars.
#   bash bench/device_run.sh "$OUT"
# DEVICE, TOTAL_S, SUITE_ARGS, TRAIN_ARGS and SHAPE_ARGS override the defaults (a CPU smoke test uses tiny sizes);
# COMMIT names the commit in the results (pass `git rev-parse --short HEAD` from here: the device's git metadata can be older).
# The device's image has torch, scipy, PyYAML, safetensors and pytest but not trimesh (the shape datasets need
# it): download its wheel here first, into .whl (ignored; pass carry [".whl", "out/device"]):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trimesh==5.2.0
set -uo pipefail
out=${1:?usage: bench/device_run.sh OUT_DIR}
device=${DEVICE:-cuda}
total_s=${TOTAL_S:-480}
steps=" ${STEPS:-tests suite shape-speed} "
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
log=$out/run.log
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"; } >>"$log" 2>&1

step() { [[ $steps == *" $1 "* ]]; }

if step tests; then
  timeout $((total_s / 6)) python3 -m pytest -q -p no:cacheprovider test/test_cuda_graph.py >"$out/tests.log" 2>&1
  echo "tests exit $? at ${SECONDS} s" >>"$log"
fi

if step suite; then
  suite_s=$((total_s * 2 / 5))
  timeout $((suite_s + 60)) python3 bench/device_suite.py run --device "$device" --budget-s $suite_s --profile \
    --out "$out/suite.json" ${SUITE_ARGS:-} >>"$log" 2>&1
  echo "suite exit $? at ${SECONDS} s" >>"$log"
  timeout $((total_s / 6 + 30)) python3 bench/device_suite.py run --device "$device" --sections latency --repeats 1 --no-cuda-graphs \
    --budget-s $((total_s / 6)) --out "$out/suite_eager.json" ${SUITE_ARGS:-} >>"$log" 2>&1
  echo "eager latency exit $? at ${SECONDS} s" >>"$log"
fi

if step train; then
  # The datasets both trainings read, generated once (the two runs would race on the cache).
  python3 -c "
from mace_ros.core.shape.training import DATA_CACHE_DIR, VALIDATION_OBJECTS, load_or_generate
from mace_ros.core.shape.datasets import HELD_OUT_FAMILY, TRAINING_FAMILIES
import sys
objects, points = (int(v) for v in sys.argv[1:3])
load_or_generate('tabletop', objects + VALIDATION_OBJECTS, points, 0, TRAINING_FAMILIES, DATA_CACHE_DIR)
load_or_generate('tabletop', VALIDATION_OBJECTS, points, 1, (HELD_OUT_FAMILY,), DATA_CACHE_DIR)
print('datasets ready')
" "${DATASET_OBJECTS:-10000}" "${DATASET_POINTS:-2048}" >>"$log" 2>&1
  shape_s=0
  step shape-speed && shape_s=60
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
fi

if step shape-speed; then
  left=$((total_s - SECONDS > 30 ? total_s - SECONDS : 30))
  timeout $left python3 bench/device_suite.py shape-speed --device "$device" --weights mace_ros/core/data/shape_vae_2048.safetensors \
    --budget-s $((left - 20)) --profile --out "$out/shape_speed.json" ${SHAPE_ARGS:-} >>"$log" 2>&1
  echo "shape-speed exit $? at ${SECONDS} s" >>"$log"
fi
echo "all done at ${SECONDS} s" >>"$log"
