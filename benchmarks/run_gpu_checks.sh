#!/usr/bin/env bash
# The GPU checks of the training issues in one run on a CUDA machine (results:
# benchmarks/gpu_training.md): the CUDA-graph tests, a `trainer=gpu` fit with and without
# CUDA graphs, the rollout benchmark and the training throughput rows. Each part has its own
# time limit, so one that hangs does not take the others with it; logs and JSON go to $OUT.
#   OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh
# Needs torch (CUDA), lightning, torchdiffeq, pandas, pyarrow, pytest, hydra-core, omegaconf.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
{ nvidia-smi -L; $PY -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'lightning', lightning.__version__)"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# Warnings of the machine's own library versions must not fail the checks: -o filterwarnings=
timeout 90 $PY -m pytest -q -m gpu -o filterwarnings= -p no:cacheprovider \
    tests/training/test_lit_module.py 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 130 $PY benchmarks/bench_gpu_training.py fit --epochs 3 --json "$OUT/fit.json" \
    > "$OUT/fit.log" 2>&1; grep '^{' "$OUT/fit.log"; tail -3 "$OUT/fit.log"
timeout 150 $PY benchmarks/bench_gpu_training.py rollout --repeats 3 --json "$OUT/rollout.json" \
    2>&1 | tee "$OUT/rollout.log"
timeout 100 $PY benchmarks/bench_training.py --cuda-only --batches 16 256 --repeats 3 \
    --warmup 3 --json "$OUT/throughput.json" 2>&1 | grep -v Warning | tee "$OUT/throughput.log"
