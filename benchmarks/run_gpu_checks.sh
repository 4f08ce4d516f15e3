#!/usr/bin/env bash
# The GPU checks of the training issues on a CUDA machine (results: benchmarks/gpu_training.md),
# in parts that fit one device call each:
#   OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh rollout   # network alone, gpu tests, rollout
#   OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh fit       # `twin train trainer=gpu` fits
#   OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh profile   # batch 131,072, top kernels
#   OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh fused     # did the fused network run?
# Each step has its own time limit, so one that hangs does not take the others with it; logs and
# JSON go to $OUT. The fits: eager (the reference), then the default fast path twice with one
# new inductor/Triton cache (cold: every graph compiled; warm: read from the disk cache, as a
# second fit of the same model structure on a workstation), then CUDA graphs alone.
# Needs torch (CUDA), lightning, torchdiffeq, pandas, pyarrow, pytest, hydra-core, omegaconf.
set -u
OUT=${OUT:-/tmp/gpu_checks}
PART=${1:-rollout}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
{ nvidia-smi -L; $PY -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'lightning', lightning.__version__)"; nproc; } > "$OUT/gpu_$PART.txt" 2>&1
cat "$OUT/gpu_$PART.txt"
bench="$PY benchmarks/bench_gpu_training.py"
if [ "$PART" = rollout ]; then
    # The residual network alone: plain layers vs the fused kernels' block shapes and precisions.
    timeout ${NETWORK_S:-150} $bench network --batches 16384 131072 --json "$OUT/network.json" \
        2>&1 | grep -v Warning | tee "$OUT/network.log"
    # Warnings of the machine's own library versions must not fail the checks: -o filterwarnings=
    timeout ${TESTS_S:-200} $PY -m pytest -q -m gpu -o filterwarnings= -p no:cacheprovider \
        tests/hybrid_twin/test_fused_mlp.py tests/training/test_lit_module.py 2>&1 \
        | tee "$OUT/pytest_gpu.log" | tail -30
    # The table (PROFILE=N: at the largest batch also the top N kernels of each method).
    timeout ${ROLLOUT_S:-360} $bench rollout --repeats ${REPEATS:-2} --profile ${PROFILE:-0} \
        --json "$OUT/rollout.json" 2>&1 | grep -v Warning | tee "$OUT/rollout.log"
elif [ "$PART" = profile ]; then
    # Where the fast path spends its time at the largest batch (benchmarks/gpu_training.md).
    timeout ${PROFILE_S:-240} $bench rollout --batches ${BATCHES:-131072} --repeats 2 --profile 25 \
        --methods "torchdiffeq rk4 (jump_t)" "CUDA graph + compiled steps (fast path)" \
        "CUDA graph + compiled steps (fast path) + fused network" \
        --json "$OUT/profile.json" 2>&1 | grep -v Warning | tee "$OUT/profile.log"
elif [ "$PART" = fused ]; then
    # The open question of benchmarks/gpu_training.md: in the compiled, graphed steps the fused
    # rows timed the plain network. fused_launches == 0 in a fused row means it did again.
    timeout ${ROLLOUT_S:-300} $bench rollout --batches ${BATCHES:-131072} --repeats 2 \
        --methods "CUDA graph + compiled steps (fast path)" \
        "CUDA graph + compiled steps (fast path) + fused network" "fused network, eager steps" \
        --json "$OUT/fused_rollout.json" 2>&1 | grep -v Warning | tee "$OUT/fused_rollout.log"
    timeout ${NETWORK_S:-200} $bench network --batches 131072 --json "$OUT/network_131072.json" \
        2>&1 | grep -v Warning | tee "$OUT/network_131072.log"
else
    # name:variant:time limit (s)
    for run in ${FITS:-eager:eager:240 fast_cold:fast:150 fast_warm:fast:90 graphs:graphs:90}; do
        set -- ${run//:/ }
        # A cold fit starts from an empty cache (a second call on a warm machine would not).
        case $1 in *_cold) rm -rf /tmp/fit_cache ;; esac
        TORCHINDUCTOR_CACHE_DIR=/tmp/fit_cache/inductor TRITON_CACHE_DIR=/tmp/fit_cache/triton \
            timeout $3 $bench fit --epochs ${EPOCHS:-8} --variants $2 \
            --json "$OUT/fit_$1.json" > "/tmp/fit_$1.log" 2>&1
        echo "fit $1 exit $?" | tee -a "$OUT/fit.log"; cat "/tmp/fit_$1.log" >> "$OUT/fit.log"
        grep '^{' "/tmp/fit_$1.log" | cut -c1-700; tail -2 "/tmp/fit_$1.log" | cut -c1-300
    done
fi
