#!/usr/bin/env bash
# Every GPU check of issues 13 and 20, for one H100/H200, in parts that each fit one 9-minute command
# and write their JSON/logs as they go (a part cut short keeps what it finished):
#   profile    (~3 min): benchmarks/profile_step.py - torch.profiler over the compiled student alone and
#                        student + teacher + IFD: top kernels, host syncs, teacher/student/IFD/optimizer split
#   tests      (~6 min): tests/test_cuda.py - Triton IFD kernel vs float64; no synchronizing CUDA call in
#                        the step (set_sync_debug_mode "error"); 2-stage bf16 chain (exports load); grown
#                        2-stage chain in bf16 + ZeRO-3 through `compt-scale chain`
#   kernel     (~2 min): benchmarks/ifd_kernel.py
#   throughput (~4 min): benchmarks/throughput.py (hand-wired peer, trainer, trainer + teacher + IFD)
#   chain      (~8 min): benchmarks/chain_speedup.py (3-decoder chain vs independent runs, matched quality
#                        in MACs and GPU-seconds)
# `all` runs them in that order (~25 min: for machines without a per-command limit), each with its own budget.
# A benchmark that fails is retried once without liger-kernel and with the reference IFD loss when time
# allows; every step has a time limit so the later ones still run. Results (JSON) and logs go to RESULTS.
# Usage, from the project root on the GPU machine (deepspeed, open_clip, datasets importable):
#   bash benchmarks/gpu_all.sh RESULTS [profile|tests|kernel|throughput|chain|all] [SECONDS]
set -u
R=${1:?results dir}
PART=${2:-all}
BUDGET=${3:-540}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[[ $TORCH_CUDA_ARCH_LIST == *a ]] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST%a}  # DeepSpeed's JIT parses it
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[gpu_all $PART +$((SECONDS - START))s] $*"; }
want() { [[ $PART == "$1" || $PART == all ]]; }
next_part() { [[ $PART == all ]] && START=$SECONDS; }   # each part its own budget under `all`
FALLBACK="--liger off --ifd-kernel reference"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, deepspeed
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'deepspeed', deepspeed.__version__)"
python3 -c "import liger_kernel" 2>/dev/null && say "liger-kernel importable" || say "liger-kernel NOT importable"
# DeepSpeed's FusedAdam is JIT-built once per machine (torch's extension cache); later engines load it.
python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  > "$R/fused_adam_build_$PART.log" 2>&1 || say "FusedAdam build failed: see fused_adam_build_$PART.log"
say "FusedAdam ready"

if want profile; then
  say "profile_step"
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_step.py --out "$R/profile_step.json" \
    > "$R/profile_step.log" 2>&1 || say "profile_step exited $?"
  grep -v "WARN\|Warning\|USDT" "$R/profile_step.log" | tail -6
  next_part
fi

if want tests; then
  # Separately: a slow kernel suite cannot starve the step and chain tests.
  say "pytest: no sync in the step, grown bf16 + ZeRO-3 chain"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "sync or grown" -rfE --tb=short 2>&1 \
    | tee "$R/pytest_cuda_step.log" | tail -25
  say "pytest: 2-stage bf16 chain"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "two_stage" -rfE --tb=short 2>&1 \
    | tee "$R/pytest_cuda_chain.log" | tail -15
  say "pytest: Triton IFD kernel ($(left) s left)"
  timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k kernel -rfE \
    --tb=line 2>&1 | tee "$R/pytest_cuda_kernel.log" | tail -15
  next_part
fi

if want kernel; then
  say "ifd_kernel"
  # 4 shapes x (eager, compile, reference, kernel, kernel at 4 and 64 MiB chunks), loop and CUDA-graph
  # timings; the JSON is rewritten after every measurement, so a timeout keeps what was measured.
  timeout $(( $(left) - 10 )) python3 benchmarks/ifd_kernel.py --chunk-mib 4,64 --out "$R/ifd_kernel.json" 2>&1 | tail -16
  next_part
fi

if want throughput; then
  say "throughput ($(left) s left)"
  timeout $(( $(left) - 5 )) python3 benchmarks/throughput.py --out "$R/throughput.json" 2>&1 | tail -30
  if python3 -c "import json, sys; r = json.load(open('$R/throughput.json'))['results']
sys.exit(0 if any('error' in r.get(k, {}) for k in 'bc') else 1)" 2>/dev/null && (( $(left) > 150 )); then
    say "throughput (b)/(c) failed: again with $FALLBACK"
    timeout $(( $(left) - 5 )) python3 benchmarks/throughput.py --setups bc $FALLBACK \
      --out "$R/throughput-fallback.json" 2>&1 | tail -12
  fi
  next_part
fi

if want chain; then
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
