#!/usr/bin/env bash
# The GPU checks in one go (device tool: one call): the GPU tests, then the benchmarks.
#   bash benchmarks/gpu_check.sh            # writes to $OUT (or ./gpu_out) as well as stdout
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# 1. GPU tests (the compiled kernel, not the interpreter)
TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_linear.py tests/test_distributed.py 2>&1 | tee "$OUT/tests.txt"
TRITON_INTERPRET=0 python3 -m pytest -q -x tests/test_loss.py -k "triton and not compile" -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
# 2. The issue's point: B=4096, K=131072, bf16 and fp32, against eager, compile and Liger when installed
python3 benchmarks/bench_loss.py --device cuda --dtype bf16 fp32 --B 4096 --K 131072 --npos 8 2>&1 | tee "$OUT/bench_point.txt"
python3 benchmarks/bench_loss.py --device cuda --dtype bf16 --B 4096 --K 131072 --npos 1 2>&1 | tee -a "$OUT/bench_point.txt"
# 2b. Rows in flight: the row kernel on 128..1024 programs (each looping over rows) against one per row
python3 benchmarks/bench_loss.py --device cuda --dtype bf16 fp32 --B 4096 --K 131072 --npos 8 --cases torch ours ours-p128 ours-p256 ours-p512 ours-p1024 2>&1 | tee -a "$OUT/bench_point.txt"
# 3. The fused linear + loss at the issue's point: B=8192, D=1024, K=262144 bf16, against the GEMMs, naive, CCE, Liger
python3 benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144 --reps 5 2>&1 | tee "$OUT/bench_linear.txt"
# 4. Where the time goes (torch.profiler): the loss kernel at the issue's point, the two linear routes
python3 benchmarks/bench_loss.py --device cuda --dtype bf16 --B 4096 --K 131072 --npos 8 --profile --cases ours 2>&1 | tee "$OUT/profile.txt"
python3 benchmarks/bench_linear.py --device cuda --dtype bf16 --B 8192 --D 1024 --K 262144 --profile --cases ours-fast ours-lean 2>&1 | tee -a "$OUT/profile.txt"
# 5. The sweep (K 1k..1M, B 1..16k, 1 and 8 positives), ours and eager only to fit the budget
python3 benchmarks/bench_loss.py --device cuda --dtype bf16 --sweep --reps 5 --cases torch ours 2>&1 | tee "$OUT/bench_sweep.txt"
