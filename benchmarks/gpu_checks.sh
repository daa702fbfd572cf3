#!/usr/bin/env bash
# What a GPU machine adds to the CPU test run, in one go (about 8 minutes on one H100):
#   1. the CUDA tests (tests/test_cuda.py) with the golden and training-step tests;
#   2. the seed study: held-out HC18 learning curves of our training loop and of the published loop, 8 seeds each,
#      16 processes sharing the GPU (benchmarks/bench_training.py --seeds);
#   3. the model benchmark, whose CUDA fp32 and bf16 rows need the GPU (benchmarks/bench_model.py).
# Usage: bash benchmarks/gpu_checks.sh [results folder]
#   SAM_MED2D_SHARED: the shared folder (spec goldens and data/hc18) when it is not ../shared;
#   STUDY_SECONDS: stop the seed study after this long (default 300; finished epochs are kept).
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
study_seconds=${STUDY_SECONDS:-300}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

timeout 180 $python -m pytest -q -p no:cacheprovider -rs \
    tests/test_cuda.py tests/test_model_golden.py tests/test_training_step.py 2>&1 | tee "$out/gpu_pytest.log" | tail -25

timeout $((study_seconds + 60)) $python -m benchmarks.bench_training --seeds 0,1,2,3,4,5,6,7 --loops ours,published \
    --device cuda --jobs 16 --threads 1 --epochs 5 --study-seconds "$study_seconds" 2>&1 | tee "$out/gpu_seed_study.log"
cp benchmarks/results/training_curve_seeds_cuda.json benchmarks/results/training_curve_seeds_cuda.png "$out"/

timeout 150 $python -m benchmarks.bench_model --repeats 5 --clicks 30 --json "$out/gpu_bench_model.json" 2>&1 \
    | tee "$out/gpu_bench_model.log"
