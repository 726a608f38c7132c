"""Test set-up. Without a GPU, Triton runs its kernels through its CPU interpreter: TRITON_INTERPRET=1 has to be set
before the kernel module is imported, so it is set here, before any test module imports mini_mamba."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager_and_compiled(module: torch.nn.Module, inputs: torch.Tensor, loss) -> tuple[dict, dict]:
    """module's output and every gradient (inputs' and parameters') of loss(output), eager and under torch.compile:
    two dicts of tensors by name ("out", "inputs", then the parameters' names). A GPU only: torch.compile cannot
    trace the kernels as Triton's CPU interpreter runs them."""
    results = []
    for run in (module, torch.compile(module)):
        module.zero_grad()
        inputs.grad = None
        out = run(inputs)
        loss(out).backward()
        results.append({"out": out.detach(), "inputs": inputs.grad.clone(),
                        **{name: p.grad.clone() for name, p in module.named_parameters()}})
    return results[0], results[1]
