"""Test set-up. Without a GPU, Triton runs its kernels through its CPU interpreter: TRITON_INTERPRET=1 has to be set
before the kernel module is imported, so it is set here, before any test module imports mini_mamba."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
