#!/usr/bin/env bash
# Every GPU check of issue 13, for one H100/H200, in two parts that each fit one 10-minute command:
#   checks (~6 min): tests/test_cuda.py (Triton IFD kernel vs float64; a 2-stage bf16 chain whose exports
#                    load), benchmarks/ifd_kernel.py, benchmarks/throughput.py
#   chain  (~6 min): benchmarks/chain_speedup.py (3-decoder chain vs independent runs, matched quality)
# `all` runs both, one after the other (~12 min: for machines without a per-command limit).
# Timings measured on the H200 (2026-12-04): test kernels + ifd_kernel ~4 min, throughput ~3.5 min
# (three processes, two torch.compile), chain ~6 min (5 stages: ~2 min training, the rest start-up,
# evals, final checkpoints and exports).
# A benchmark that fails is retried once without liger-kernel and with the reference IFD loss when time
# allows; every step has a time limit so the later ones still run. Results (JSON) and logs go to RESULTS.
# Usage, from the project root on the GPU machine (deepspeed, open_clip, datasets importable):
#   bash benchmarks/gpu_all.sh RESULTS [checks|chain|all] [SECONDS]
set -u
R=${1:?results dir}
PART=${2:-all}
BUDGET=${3:-570}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[[ $TORCH_CUDA_ARCH_LIST == *a ]] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST%a}  # DeepSpeed's JIT parses it
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[gpu_all $PART +$((SECONDS - START))s] $*"; }
FALLBACK="--liger off --ifd-kernel reference"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, deepspeed, open_clip, datasets
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__, 'datasets', datasets.__version__)"
python3 -c "import liger_kernel" 2>/dev/null && say "liger-kernel importable" || say "liger-kernel NOT importable"
# DeepSpeed's FusedAdam is JIT-built once per machine (torch's extension cache); later engines load it.
python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  > "$R/fused_adam_build_$PART.log" 2>&1 || say "FusedAdam build failed: see fused_adam_build_$PART.log"
say "FusedAdam ready"

if [[ $PART == checks || $PART == all ]]; then
  # Kernel tests and the chain test separately: a slow kernel suite cannot starve the chain test.
  say "pytest: Triton IFD kernel"
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k kernel -rfE --tb=line 2>&1 \
    | tee "$R/pytest_cuda.log" | tail -15
  say "pytest: 2-stage bf16 chain"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k chain -rfE --tb=short 2>&1 \
    | tee -a "$R/pytest_cuda.log" | tail -25
  say "ifd_kernel"
  # 4 shapes x (eager, compile, reference, kernel, kernel at 4 and 64 MiB chunks), loop and CUDA-graph
  # timings; the JSON is rewritten after every measurement, so a timeout keeps what was measured.
  timeout 240 python3 benchmarks/ifd_kernel.py --chunk-mib 4,64 --out "$R/ifd_kernel.json" 2>&1 | tail -16
  say "throughput ($(left) s left)"
  timeout $(( $(left) - 5 )) python3 benchmarks/throughput.py --out "$R/throughput.json" 2>&1 | tail -30
  if python3 -c "import json, sys; r = json.load(open('$R/throughput.json'))['results']
sys.exit(0 if any('error' in r.get(k, {}) for k in 'bc') else 1)" 2>/dev/null && (( $(left) > 150 )); then
    say "throughput (b)/(c) failed: again with $FALLBACK"
    timeout $(( $(left) - 5 )) python3 benchmarks/throughput.py --setups bc $FALLBACK \
      --out "$R/throughput-fallback.json" 2>&1 | tail -12
  fi
  [[ $PART == all ]] && START=$SECONDS  # the chain gets its own budget
fi

if [[ $PART == chain || $PART == all ]]; then
  # --time-limit stops the chain in time and still analyses the stages that finished.
  say "chain_speedup"
  python3 benchmarks/chain_speedup.py --time-limit $(( $(left) - 15 )) --out "$R/chain_speedup.json" \
    > "$R/chain_speedup.log" 2>&1
  rc=$?
  if (( rc != 0 )) && (( $(left) > 400 )); then  # failed early: once more without the optional pieces
    say "chain_speedup exited $rc: again with $FALLBACK"
    python3 benchmarks/chain_speedup.py $FALLBACK --time-limit $(( $(left) - 15 )) \
      --out "$R/chain_speedup.json" >> "$R/chain_speedup.log" 2>&1
  fi
  grep -v "it/s\|WARN\|Warning\|return func\|Backend impl" "$R/chain_speedup.log" | tail -12
fi
say "done"
