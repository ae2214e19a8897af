import os

import torch

# Triton kernels run on CPU tensors under its interpreter; it must be chosen before triton is
# imported. With a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
