"""The benchmark scripts run end to end on tiny inputs (no timings are checked).

A device session is short: a script that fails on a case name or an option would waste it, so every case that
``benchmarks/gpu_check.sh`` passes is run here first, on the CPU (Triton's cases under the interpreter).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IMPLS

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _common import split_knobs  # noqa: E402

# the cases run below: every case that gpu_check.sh passes must be one of them (or a peer's, timed when installed)
LOSS_CASES = ["torch", "ours", "ours-triton", "ours-torch", "ours-small", "ours-dense", "ours-r", "ours-f", "ours-w32",
              "ours-s", "ours-w32-s", "ours-w32-p132-s", "ours-n3", "ours-n3-s", "ours-n4-s", "ours-l-s", "ours-l-g4-s",
              "ours-l-c65536-s", "ours-s-p264", "ours-r-p2", "ours-b64", "compile", "ours-cg"]
LINEAR_CASES = ["gemms", "naive", "ours-fast", "ours-fast-r", "ours-fast-e", "ours-fast-n3-s", "ours-lean",
                "ours-lean-r", "ours-lean-e", "ours-lean-a", "ours-lean-k"]
PEERS = {"liger", "cce", "cce-exact"}


def test_case_names_parse_into_kernel_knobs():
    loss, linear = "triton_loss", "triton_linear"
    assert split_knobs("ours") == ("ours", {})
    assert split_knobs("ours-torch") == ("ours-torch", {})
    assert split_knobs("ours-dense") == ("ours-dense", {})
    assert split_knobs("naive-ours") == ("naive-ours", {})
    assert split_knobs("ours-r-p132") == ("ours", {(loss, "REVERSE_GRAD"): True, (linear, "REVERSE_GRAD"): True,
                                                   (loss, "ROW_PROGRAMS"): 132})
    assert split_knobs("ours-f") == ("ours", {(loss, "REVERSE_GRAD"): False})
    assert split_knobs("ours-w32-s") == ("ours", {(loss, "ROW_WARPS"): 32, (loss, "STORE_EVICT_FIRST"): True})
    assert split_knobs("ours-b8192") == ("ours", {(loss, "MAX_BLOCK"): 8192})
    assert split_knobs("ours-n3-s") == ("ours", {(loss, "ROW_STAGES"): 3, (loss, "STORE_EVICT_FIRST"): True})
    assert split_knobs("ours-l-g4-c65536") == ("ours", {(loss, "LAGGED"): True, (loss, "LAGGED_PER_SM"): 4,
                                                        (loss, "LAGGED_SPAN_BYTES"): 65536})
    assert split_knobs("ours-fast-e") == ("ours-fast", {(linear, "EPILOGUE"): True})
    assert split_knobs("ours-lean-r") == ("ours-lean", {(loss, "REVERSE_GRAD"): True, (linear, "REVERSE_GRAD"): True})
    assert split_knobs("ours-lean-a") == ("ours-lean", {(linear, "LEAN_ROWS"): True})
    assert split_knobs("ours-lean-k") == ("ours-lean", {(linear, "LEAN_ROWS"): False})
    assert split_knobs("ours-e5") == ("ours-e5", {})  # a switch takes no number: not a knob


def _run(script, *args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif("triton" not in IMPLS, reason="no usable Triton (>= 3.4)")
def test_loss_benchmark_runs_every_case_of_the_gpu_check():
    cases = LOSS_CASES
    out = _run("bench_loss.py", "--device", "cpu", "--B", "3", "--K", "300", "--npos", "2", "--reps", "1",
               "--cases", *cases)
    rows = {line.split()[4] for line in out.splitlines() if line.startswith("fp32")}
    assert rows == set(cases) and "skipped" not in out, out


@pytest.mark.skipif("triton" not in IMPLS, reason="no usable Triton (>= 3.4)")
def test_loss_benchmark_runs_fp16_under_a_loss_scale():
    """gpu_check.sh's fp16 line: its options parse and its cases run."""
    cases = ["torch", "ours", "ours-triton", "ours-torch"]
    out = _run("bench_loss.py", "--device", "cpu", "--dtype", "fp16", "--B", "3", "--K", "300", "--npos", "2",
               "--reps", "1", "--loss-scale", "16384", "--cases", *cases)
    rows = {line.split()[4] for line in out.splitlines() if line.startswith("fp16")}
    assert rows == set(cases) and "skipped" not in out, out


def test_linear_benchmark_runs_every_case_of_the_gpu_check():
    cases = LINEAR_CASES
    out = _run("bench_linear.py", "--device", "cpu", "--B", "8", "--D", "16", "--K", "300", "--reps", "1",
               "--cases", *cases)
    rows = {line.split()[0] for line in out.splitlines()[2:]}
    assert rows == set(cases) and "skipped" not in out, out


def test_linear_benchmark_amp_mode():
    """--amp: an fp32 weight and every forward under autocast (the CPU's bf16 here)."""
    cases = ["gemms", "naive", "ours-fast", "ours-lean"]
    out = _run("bench_linear.py", "--device", "cpu", "--dtype", "bf16", "--amp", "--B", "8", "--D", "16", "--K", "300",
               "--reps", "1", "--cases", *cases)
    rows = {line.split()[0] for line in out.splitlines()[2:]}
    assert "autocast, fp32 weight" in out and rows == set(cases) and "skipped" not in out, out


def test_eval_benchmark_runs():
    out = _run("bench_eval.py", "--N", "20", "--D", "8", "--K", "300", "--batch", "7")
    assert "full / top-k" in out and "largest difference 0.00e+00" in out, out


def test_dw_accumulation_study_runs():
    out = _run("dw_accumulation.py", "--B", "256", "--D", "32", "--K", "512", "--chunks", "1", "4")
    assert len(out.splitlines()) == 4, out


@pytest.mark.skipif("triton" not in IMPLS, reason="no usable Triton (>= 3.4)")
def test_overhead_benchmark_runs_with_stubbed_kernels():
    out = _run("bench_overhead.py", "--device", "cpu", "--stub", "--B", "4", "--K", "300", "--n", "5")
    assert "Triton kernels stubbed" in out and "ours fwd+bwd" in out, out


@pytest.mark.skipif("triton" not in IMPLS, reason="no usable Triton (>= 3.4)")
def test_kernel_registers_reports_every_kernel():
    """Every kernel compiles as the launchers call it; the two-pass kernel streams its rows in 128-bit vectors at an
    odd K (rows peeled to a 16-byte boundary) as at the issue's K, with registers for two 16-warp programs a SM in
    bf16 (ptxas on this Triton)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(BENCH / "kernel_registers.py")], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    two_pass = ["two-pass", "two-pass/32w", "two-pass/n3", "lagged"]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (name, d, k) for d in ("bf16", "fp32")
        for k in ("131072", "131071") for name in two_pass]
    assert all(int(r[5]) > 0 and int(r[7]) >= 1 for r in rows), proc.stdout
    for r in rows:
        if r[0].startswith("two-pass") or r[0] == "lagged":  # the rows' loads and stores of x and g: 128-bit
            assert int(r[8].split("/")[0]) >= 6, proc.stdout
    assert all(int(r[7]) == 2 for r in rows if r[0] == "two-pass" and r[1] == "bf16"), proc.stdout
    # the lagged kernel fits LAGGED_PER_SM programs a SM (they must all be resident; the launcher also checks)
    from mlsoftmax.kernels import triton_loss

    assert all(int(r[7]) >= triton_loss.LAGGED_PER_SM for r in rows if r[0] == "lagged"), proc.stdout
    # ROW_STAGES = 3 pipelines both loops: their loads become 16-byte cp.async copies into shared memory
    assert all(float(r[9]) >= 64 and int(r[8].split("/")[0]) >= 24 for r in rows if r[0] == "two-pass/n3"), \
        proc.stdout


def test_gpu_check_passes_only_cases_run_here():
    """Each ``--cases`` list in gpu_check.sh (defaults of its ``${VAR:-...}`` overrides included) names cases that
    the tests above run, for the script it goes to (``$L``: bench_loss.py, ``$F``: bench_linear.py), or a peer's
    (timed only where it is installed): a typo there would cost a device run."""
    import re

    text = (BENCH / "gpu_check.sh").read_text().replace("\\\n", " ")  # join continued lines
    calls = re.findall(r"\$(L|F)\b[^\n;]*?--cases (?:\$\{\w+:-)?([\w \t-]+)", text)
    assert len(calls) >= 10, calls
    for script, cases in calls:
        known = (LOSS_CASES if script == "L" else LINEAR_CASES) + sorted(PEERS)
        unknown = [c for c in cases.split() if c not in known]
        assert not unknown, f"gpu_check.sh passes ${script} unknown cases {unknown}"


def test_gpu_check_test_steps_select_gpu_tests():
    """Each pytest step of gpu_check.sh (its files, ``-m gpu`` and any ``-k``) collects GPU tests here too: a
    filter that matched none would spend a device run on an empty step."""
    import re
    import shlex

    text = (BENCH / "gpu_check.sh").read_text().replace("\\\n", " ")
    steps = re.findall(r"python3 -m pytest ([^\n;]+?)(?:;|\n)", text)
    assert len(steps) >= 5, steps
    for step in steps:
        args = [a for a in shlex.split(step) if a not in ("-q", "-x")]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
                              cwd=BENCH.parent, capture_output=True, text=True, timeout=300, check=False)
        n = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", proc.stdout)
        assert proc.returncode == 0 and n and int(n.group(1)) > 0, (step, proc.stdout[-2000:])
