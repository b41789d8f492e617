#!/usr/bin/env bash
# The one command for the GPU machine: GPU test suite, then the benchmark, short table last.
#   scripts/gpu_run.sh [tests|bench|mmfa|demo|all] [bench preset] [extra bench args...]
# tests: the GPU test suite; bench: bench/attention.py; mmfa: bench/mmfa.py (the pruning pipeline);
# demo: `mmfa demo` in its GPU configurations; all: tests then bench/attention.py.
# Runs from the repo root; results land in $OUT (or results/) when set.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-results}"; mkdir -p "$out"
what="${1:-all}"; preset="${2:-target}"; shift $(( $# > 2 ? 2 : $# ))
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
status=0
if [[ "$what" == tests || "$what" == all ]]; then
  python3 -m pytest --gpu -m gpu -n 6 -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -n 25 || status=1
fi
if [[ "$what" == bench || "$what" == all ]]; then
  python3 bench/attention.py --preset "$preset" --out "$out/attention_$preset.csv" "$@" 2>&1 | tee "$out/bench_$preset.log" | grep -v "^mmfa\|^jax\|^torch" || status=1
fi
if [[ "$what" == mmfa ]]; then
  python3 bench/mmfa.py --preset "$preset" --out "$out/mmfa_$preset.csv" "$@" 2>&1 | tee "$out/mmfa_$preset.log" || status=1
fi
if [[ "$what" == demo ]]; then
  python3 -m mmfa_jax.cli demo --out "$out/mmfa_demo.png" "$@" 2>&1 | tee "$out/demo.log" || status=1
fi
exit $status
