import os

# The Triton kernels run on the CPU under the interpreter in CI. It must be set
# before triton is first imported, so it lives in the root conftest (loaded first).
os.environ.setdefault("TRITON_INTERPRET", "1")
