#!/usr/bin/env bash
# The GPU checks in one go (device tool: one call): the GPU tests, then the benchmarks.
#   bash benchmarks/gpu_check.sh                 # every step, most wanted first, inside one time budget
#   bash benchmarks/gpu_check.sh sweep amp       # only the steps named (say, those a first call did not reach)
#   BUDGET=300 bash benchmarks/gpu_check.sh      # seconds for all the steps together (default 560)
#   SWEEP_CASES="ours ours-f" LINEAR_CASES="gemms ours-fast" POINT_CASES="ours ours-w32" bash benchmarks/gpu_check.sh sweep linear point
# Writes each step's output to $OUT (or ./gpu_out) as well as stdout.
# Liger-Kernel and Cut Cross-Entropy join the tables when importable (wheels in .whl/ are installed first).
# Each step has its own time cap, cut further to what is left of BUDGET (and a KILL 10 s after it: a hung kernel
# can leave a process deaf to TERM), so that one slow step cannot starve the rest; a step that would get under
# 15 s is skipped and named at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
BUDGET="${BUDGET:-560}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
L="python3 benchmarks/bench_loss.py --device cuda"
F="python3 benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144"
SKIPPED=""
cap() {  # cap SECONDS: the step's cap, cut to what is left of BUDGET (0: skip the step)
  local left=$((BUDGET - SECONDS)); local t=$(( $1 < left ? $1 : left )); [ "$t" -ge 15 ] && echo "$t" || echo 0
}
run() {  # run CAP FILE CMD...: CMD under the cap, its output to stdout and appended to $OUT/FILE
  local t; t=$(cap "$1"); local f="$2"; shift 2
  if [ "$t" = 0 ]; then SKIPPED="$SKIPPED ${FUNCNAME[1]}"; return 1; fi
  echo "== [$SECONDS s] $* (cap $t s)" | tee -a "$OUT/$f"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$OUT/$f"
  return "${PIPESTATUS[0]}"
}
# 1. The loss at the issue's point (B=4096, K=131072, bf16 and fp32): ours; the gradient stored evict_first (-s);
#    half the rows in flight, one 32-warp program a SM, with -s (-w32-p132-s); the loops software-pipelined (-n3,
#    -n4: 2 or 3 blocks of cp.async in flight, one program a SM), with -s too; the lagged kernel with -s (-l-s; 4
#    programs a SM, -g4; last, since its programs wait for each other); against eager PyTorch. Then an odd K
#    (131071: rows peeled to a 16-byte boundary, PEEL), whose time should be the aligned K's; then rows of 2^20
#    classes (the sweep's longest), where the one-row kernel's second read misses L2 most
point() {
  run 150 bench_point.txt $L --dtype bf16 fp32 --B 4096 --K 131072 --npos 8 --cases ${POINT_CASES:-torch ours \
    ours-s ours-w32-p132-s ours-n3 ours-n3-s ours-n4-s ours-l-s ours-l-g4-s}
  run 30 bench_point.txt $L --dtype bf16 fp32 --B 4096 --K 131071 --npos 8 --cases ours
  run 45 bench_point.txt $L --dtype bf16 --B 1024 --K 1048576 --npos 8 --cases ours ours-n3-s ours-l-s
}
# 1a. Liger-Kernel on its own single-label case (measured on the H100 and the H200: ours faster in both dtypes)
liger() { run 45 bench_point.txt $L --dtype bf16 fp32 --B 4096 --K 131072 --npos 1 --cases torch ours liger; }
# 2. The fused linear + loss at the issue's point (B=8192, D=1024, K=262144 bf16): both routes, against the GEMMs
#    alone, naive, and Cut Cross-Entropy as called by default (its backward skips the tiles whose gradient entries
#    are all under 2^-12: not exact) and exact (cce-exact); Liger and the pure-torch route (248 and 99 ms on an
#    H100) are left out, and so are the knobs measured slower on an H200 (-e, -r). The fast route also runs
#    with its loss kernel's loops pipelined and its stores evict_first (-n3-s: its 512 KB rows' second read, as
#    at the loss's point), and the 256 MB budget with the lean rows route (ours-lean, now the default there: three
#    GEMMs, dW accumulated in bf16, the target terms apart) and with the labels route it replaced (-k: four
#    GEMMs, measured 29.8-30.0 ms on an H200). Then K=262143, an odd K
linear() {
  run 160 bench_linear.txt $F --reps 5 --cases ${LINEAR_CASES:-gemms naive ours-fast ours-lean ours-lean-k \
    ours-fast-n3-s cce cce-exact}
  # an odd K: ours should keep the aligned K's time (chunk rows 64 elements apart, ROW_ALIGN); the plain GEMMs
  # (an odd leading dimension) show what that avoids
  run 75 bench_linear.txt $F --K 262143 --reps 3 --cases gemms ours-fast ours-lean ours-lean-k
}
# 3. The other GPU tests (the compiled kernels, not the interpreter)
tests() {
  run 170 tests.txt python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_linear.py \
    tests/test_loss.py tests/test_distributed.py tests/test_metrics.py tests/test_cli.py
}
# 4. The sweep (K 1k..1M, B 1..16k, 1 and 8 positives): eager, ours ("auto": PyTorch's own loss below 2^26
#    logits) and the Triton path at every size
sweep() { run 100 bench_sweep.txt $L --dtype bf16 --sweep --reps 5 --cases ${SWEEP_CASES:-torch ours ours-triton}; }
# 3a. Only the loss kernels' GPU tests (a default step, before the fused linear routes' benchmark), the lagged
#     kernel's last and on their own: its programs wait for each other, so a fault there could hang rather than
#     fail, and the cap's kill would lose the other tests' summary; 3c. the rest
kernel_tests() {
  run 150 tests.txt python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_loss.py \
    -k "not lagged"
  run 90 tests.txt python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k lagged
}
other_tests() {
  run 120 tests.txt python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_linear.py tests/test_distributed.py \
    tests/test_metrics.py tests/test_cli.py
}
# 3b. Only the CLI's exact resume on CUDA (its own data file, a kill after the first epoch)
resume() { run 60 tests.txt python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cli.py -k resume; }
# 5. Host-bound sizes (small inputs: the host's cost per call shows): eager, compiled, ours, ours under CUDA graphs
#    (torch.compile mode=reduce-overhead); compiled PyTorch at the issue's point too
host() {
  run 40 host.txt python3 benchmarks/bench_overhead.py --device cuda --B 1 --K 131072 --n 200
  for bk in "4096 32768" "1024 131072"; do set -- $bk
    run 45 host.txt $L --dtype bf16 --B "$1" --K "$2" --npos 8 --cases torch compile ours ours-cg
  done
  run 60 host.txt $L --dtype bf16 fp32 --B 4096 --K 131072 --npos 8 --cases torch compile
}
# 6. Mixed precision as training runs it (fp32 master weight, bf16 autocast): the fused routes against PyTorch's own
#    autocast composition; an fp32 weight's gradient is the rows route's accumulator, with no final cast. Then fp16
#    under a GradScaler's loss scale: ours (two Triton passes, the gradient formed in the backward) against eager
#    PyTorch and the torch path that "auto" took for fp16 before
amp() {
  run 60 bench_linear_amp.txt $F --amp --reps 3 --cases gemms naive ours-fast ours-lean
  run 45 bench_fp16.txt $L --dtype fp16 --B 4096 --K 131072 --npos 8 --loss-scale 16384 --cases torch ours ours-torch
}
# 7. Where the time goes: torch.profiler on the loss kernel and the linear routes
profile() {
  run 60 profile.txt $L --dtype bf16 --B 4096 --K 131072 --npos 8 --profile --cases ours
  run 90 profile.txt $F --profile --cases ours-fast ours-lean ours-lean-k
}
# 8. Nsight Compute on one launch of the loss kernel (DRAM bytes: how much of the second read comes from DRAM, with
#    each knob? L2 hit rate, time, registers, occupancy)
ncu_loss() {
  local M=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum
  M=$M,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread
  M=$M,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers
  for args in "--dtype bf16" "--dtype bf16 --stages 3 --evict-store" "--dtype bf16 --lagged --evict-store" \
              "--dtype bf16 --row-warps 32 --programs 132 --evict-store" "--dtype fp32 --stages 3 --evict-store" \
              "--dtype fp32 --lagged --evict-store"; do
    run 60 profile.txt ncu --clock-control none -k regex:_msl_ -s 2 -c 1 --metrics "$M" \
      python3 benchmarks/ncu_loss.py $args
  done
}
STEPS=("$@")
# Default order: the two open targets' measurements first (the loss at its point, issue #4; the fused linear
# routes with the lean rows route, issue #5), then the GPU tests, then the rest
[ ${#STEPS[@]} -gt 0 ] || STEPS=(point linear kernel_tests other_tests ncu_loss sweep host amp profile)
for s in "${STEPS[@]}"; do "$s"; done
echo "== done at $SECONDS s; cut for time:${SKIPPED:- nothing}" | tee -a "$OUT/gpu.txt"
