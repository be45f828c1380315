#!/usr/bin/env bash
# The GPU checks in one go (device tool: one call): the GPU tests, then the benchmarks.
#   bash benchmarks/gpu_check.sh            # writes to $OUT (or ./gpu_out) as well as stdout
# Liger-Kernel and Cut Cross-Entropy join the tables when importable (wheels in .whl/ are installed first).
# Each step has its own time cap (and a KILL 10 s after it: a hung kernel can leave a process deaf to TERM), so that
# one slow step cannot starve the rest; the most wanted come first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
L="python3 benchmarks/bench_loss.py --device cuda"
F="python3 benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144"
# 0. The one-read kernel's GPU tests first, on their own: its programs wait at a per-row barrier, so a fault
#    there could hang rather than fail. If they do not pass, its benchmark cases (-o) are left out below.
O=o
timeout -k 10 120 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_kernels.py -k one_read 2>&1 \
  | tee "$OUT/tests_one_read.txt"
[ "${PIPESTATUS[0]}" = 0 ] || O=""
o() { [ -n "$O" ] && printf '%s ' "$@"; }   # the case names given, or nothing without a working one-read kernel
# 1. GPU tests (the compiled kernels, not the interpreter)
timeout -k 10 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_linear.py \
  tests/test_distributed.py tests/test_metrics.py tests/test_cli.py -k "not one_read" 2>&1 | tee "$OUT/tests.txt"
# 2. The loss at the issue's point (B=4096, K=131072, bf16 and fp32): ours, the one-read kernel (-o; with 4096 or
#    16384 columns a program, -q<N>, and ptxas capped at 32 registers, -m32, for more programs a SM), the gradient
#    pass reversed (-r), against eager and compiled PyTorch; then Liger on its own single-label case
timeout -k 10 150 $L --dtype bf16 fp32 --B 4096 --K 131072 --npos 8 --cases torch compile ours \
  $(o ours-o ours-o-m32 ours-o-q4096 ours-o-q16384-m32)ours-r ours-dense 2>&1 | tee "$OUT/bench_point.txt"
timeout -k 10 60 $L --dtype bf16 fp32 --B 4096 --K 131072 --npos 1 --cases ours $(o ours-o)liger 2>&1 \
  | tee -a "$OUT/bench_point.txt"
# 3. The fused linear + loss at the issue's point (B=8192, D=1024, K=262144 bf16): both routes as they are; the
#    rows route with the one-read loss kernel (-o) or its gradient pass reversed (-r); both with the logits GEMM
#    carrying the loss in its epilogue (-e: Triton GEMMs, autotuned on the first call); against the GEMMs alone,
#    naive and Cut Cross-Entropy (Liger and the pure-torch route, 248 and 99 ms last time, are left out)
timeout -k 10 200 $F --reps 5 --cases gemms naive ours-fast $(o ours-fast-o)ours-fast-r ours-fast-e ours-lean ours-lean-e \
  cce 2>&1 | tee "$OUT/bench_linear.txt"
# 4. Where the time goes (all into profile.txt): the host's cost per call (small inputs are host-bound), then
#    torch.profiler on the loss kernel and the linear routes, then Nsight Compute on one launch of the loss
#    kernel (DRAM bytes: does the gradient pass re-read rows from L2, and does the one-read kernel read once?
#    L2 hit rate, time, registers, occupancy)
( timeout -k 10 40 python3 benchmarks/bench_overhead.py --device cuda | head -5
  timeout -k 10 40 python3 benchmarks/bench_overhead.py --device cuda --B 1 --K 131072 --n 200 | head -5
  [ -n "$O" ] && timeout -k 10 40 python3 benchmarks/bench_overhead.py --device cuda --B 1 --K 131072 --n 200 --one-read \
    | head -5
  echo "== host-bound sizes: eager, compiled, ours, ours under CUDA graphs (torch.compile mode=reduce-overhead)"
  for bk in "4096 32768" "1024 131072"; do set -- $bk
    timeout -k 10 45 $L --dtype bf16 --B "$1" --K "$2" --npos 8 --cases torch compile ours ours-cg
  done
  timeout -k 10 60 $L --dtype bf16 --B 4096 --K 131072 --npos 8 --profile --cases ours $(o ours-o)
  timeout -k 10 90 $F --profile --cases ours-fast $(o ours-fast-o)ours-fast-e ours-lean-e
  M=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum
  M=$M,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread
  M=$M,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers
  for args in "--dtype bf16" ${O:+"--dtype bf16 --one-read" "--dtype fp32 --one-read"} "--dtype bf16 --reverse"; do
    echo "== ncu_loss.py $args"
    timeout -k 10 60 ncu --clock-control none -k regex:_msl_ -s 2 -c 1 --metrics "$M" \
      python3 benchmarks/ncu_loss.py $args | tail -15
  done ) 2>&1 | tee "$OUT/profile.txt"
# 5. The sweep (K 1k..1M, B 1..16k, 1 and 8 positives), eager, ours and the one-read kernel, last and capped:
#    about 10 minutes in all, inside one device call
timeout -k 10 60 $L --dtype bf16 --sweep --reps 5 --cases torch ours $(o ours-o)2>&1 | tee "$OUT/bench_sweep.txt"
# 6. Mixed precision as training runs it (fp32 master weight, bf16 autocast): the fused routes against PyTorch's own
#    autocast composition; an fp32 weight's gradient is the rows route's accumulator, with no final cast
timeout -k 10 60 $F --amp --reps 3 --cases gemms naive ours-fast ours-lean 2>&1 | tee "$OUT/bench_linear_amp.txt"
