"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import ctypes
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_seconds(step, reps: int, cuda: bool, warmup: int = 2) -> float:
    """Median time of ``step()`` over ``reps`` runs after ``warmup`` runs.

    On CUDA each run sits between two CUDA events and the host never waits in
    between (as ``triton.testing.do_bench`` times): the GPU's time per run, which
    still includes any gap where the GPU waits for a slow host. On the CPU, wall time.
    """
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rss_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> int:
    """Hand freed heap pages back (``malloc_trim``), reset the peak (VmHWM) to the current RSS; returns it in kB."""
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS")


def profile_table(step, cuda: bool, reps: int = 3, rows: int = 15) -> str:
    """``torch.profiler`` table of ``reps`` runs of ``step()`` after one warm-up, top ``rows`` ops by self device
    time (CPU time on the CPU): which kernels run, how often, and for how long."""
    from torch.profiler import ProfilerActivity, profile

    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# Kernel knobs a case name can set for its calls (``ours-p132``, ``ours-f``, ``ours-fast-e-r``): a letter, then
# the value (none for a switch), on modules of :mod:`mlsoftmax.kernels` ("" for the package itself).
_ON = lambda _: True  # noqa: E731 - a switch takes no value
_OFF = lambda _: False
KNOBS = {"p": ("triton_loss", "ROW_PROGRAMS", int), "b": ("triton_loss", "MAX_BLOCK", int),
         # the gradient pass backwards (the loss's default; the fused linear routes' too, with -r) or forwards
         "r": (("triton_loss", "triton_linear"), "REVERSE_GRAD", _ON), "f": ("triton_loss", "REVERSE_GRAD", _OFF),
         "e": ("triton_linear", "EPILOGUE", _ON),
         # the lean rows route (dW accumulated in its own dtype) where the fast route does not fit the budget (on,
         # the default), or off: the labels route there
         "a": ("triton_linear", "LEAN_ROWS", _ON), "k": ("triton_linear", "LEAN_ROWS", _OFF),
         "w": ("triton_loss", "ROW_WARPS", int), "s": ("triton_loss", "STORE_EVICT_FIRST", _ON),
         "n": ("triton_loss", "ROW_STAGES", int),
         # the lagged kernel: on, its programs a SM, its slice in bytes
         "l": ("triton_loss", "LAGGED", _ON), "g": ("triton_loss", "LAGGED_PER_SM", int),
         "c": ("triton_loss", "LAGGED_SPAN_BYTES", int)}


def split_knobs(name: str) -> tuple[str, dict]:
    """``"ours-fast-e-p132"`` -> ``("ours-fast", {("triton_linear", "EPILOGUE"): True, ("triton_loss",
    "ROW_PROGRAMS"): 132})``: a case's name and the kernel knobs its suffixes set (a letter and a number, or
    a switch's letter alone; a letter may set an attribute on several modules)."""
    base, knobs = [], {}
    for part in name.split("-"):
        letter, rest = part[:1], part[1:]
        if base and letter in KNOBS and (rest.isdigit() if KNOBS[letter][2] not in (_ON, _OFF) else rest == ""):
            modules, attr, conv = KNOBS[letter]
            for module in (modules,) if isinstance(modules, str) else modules:
                knobs[module, attr] = conv(rest)
        else:
            base.append(part)
    return "-".join(base), knobs


def with_knobs(fn, knobs: dict):
    """``fn`` with the kernel ``knobs`` (of :func:`split_knobs`) set during each call, restored after."""
    if not knobs:
        return fn
    import importlib

    mods = {m: importlib.import_module("mlsoftmax.kernels" + (f".{m}" if m else "")) for m, _ in knobs}

    def tuned(*args):
        old = {(m, a): getattr(mods[m], a) for m, a in knobs}
        for (m, a), v in knobs.items():
            setattr(mods[m], a, v)
        try:
            return fn(*args)
        finally:
            for (m, a), v in old.items():
                setattr(mods[m], a, v)

    return tuned
