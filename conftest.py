import os

# The Triton kernels run on the CPU under the interpreter in CI. It must be set
# before triton is first imported, so it lives in the root conftest (loaded first).
os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_bf16_like_a_gpu() -> None:
    """Make the interpreter round fp32 -> bf16 to nearest even, as a GPU does (``cvt.rn.bf16.f32``).

    Triton's interpreter (3.x, ``InterpreterBuilder.cast_impl``) truncates the low
    16 bits instead, which biases every bf16 store of a kernel toward zero; tests of
    bf16 precision would then measure the interpreter, not the kernel. PyTorch's own
    conversion rounds to nearest even.
    """
    try:
        import numpy as np
        import torch
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no Triton: nothing to patch
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if os.environ.get("TRITON_INTERPRET") != "1" or builder is None or not hasattr(builder, "cast_impl"):
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32))  # a copy, any shape (0-d too)
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                            dst_type.scalar)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl


_round_bf16_like_a_gpu()
