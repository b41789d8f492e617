#!/usr/bin/env bash
# The one GPU regression command: every headline figure of the README, in one run, one table at the end.
#   scripts/regression.sh            (on the GPU machine, from the repo root; CSVs and logs land in $OUT or results/)
# Attention target (mmfa both faces against cuDNN), pipeline target (both faces), split-KV decode against
# torch SDPA, the block-sparse kernels per block against dense (5% and 50%), dynamic mask attention against
# dense (16k and 64k, keep 2048), and the VLM TTFT/ITL rows (LLaVA-1.5-7B, Qwen2.5-VL-7B, Gemma-3-4B shapes,
# random weights; with a DynamicCache and eager steps, and at 9216 with a StaticCache and the steps in CUDA graphs).
# VLM_FAMILIES / VLM_VISUAL override the VLM grid (e.g. VLM_VISUAL="2304 4608 9216"), VLM_STATIC_FAMILIES the
# static-cache rows' families; REGRESSION_SKIP="sparse_kernel dma" skips steps by name.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-results}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
status=0
step() { local name=$1; shift
  if [[ " ${REGRESSION_SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped (REGRESSION_SKIP)"; return; fi
  echo "== $name: $*"; local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1 || { status=1; echo "   FAILED (see $out/$name.log)"; tail -n 5 "$out/$name.log"; }
  echo "   $((SECONDS - t0)) s"; }
step attention python3 bench/attention.py --preset target --impls mmfa_jax,mmfa_torch,jax_cudnn,torch_cudnn \
  --repeats 5 --out "$out/attention.csv"
step pipeline python3 bench/mmfa.py --preset target --torch --out "$out/pipeline.csv"
step decode python3 bench/decode.py --graphs --impls mmfa_torch mmfa_prefill_kernel sdpa_cudnn sdpa_flash \
  --out "$out/decode.csv"
step decode_calls python3 bench/decode.py --impls mmfa_torch mmfa_jax sdpa_cudnn --batch 1 --out "$out/decode_calls.csv"
step sparse_kernel python3 bench/sparse.py kernel --densities 0.05,0.5 --repeats 3 --out "$out/sparse_kernel.csv"
step dma python3 bench/dma.py --lengths 16384,65536 --keeps 2048 --impls mmfa_dense,mmfa_dma --out "$out/dma.csv"
step vlm python3 bench/vlm.py --preset h100 --families ${VLM_FAMILIES:-llava qwen2_5_vl gemma3} \
  --impls sdpa mmfa mmfa+prune --keeps 0.25 --visual ${VLM_VISUAL:-2304 9216} --new-tokens 16 --out "$out/vlm.csv"
step vlm_static python3 bench/vlm.py --preset h100 --families ${VLM_STATIC_FAMILIES:-llava qwen2_5_vl gemma3} \
  --impls sdpa mmfa mmfa+prune --keeps 0.25 --visual 9216 --new-tokens 16 --cache static --out "$out/vlm_static.csv"
python3 scripts/regression_table.py "$out" | tee "$out/table.md"
exit $status
