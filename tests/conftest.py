import os

import torch

# Without a GPU the kernels run under Triton's interpreter, which must be on before any kernel module
# is imported (triton decides at @triton.jit time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
