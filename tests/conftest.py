import os

import torch

# Triton reads TRITON_INTERPRET when its kernels are defined: without a GPU, run them through the
# interpreter on CPU tensors (correctness on small shapes only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import contrastive_kernels as ck  # noqa: E402

DEVICE = "cpu"
FUSED_BACKENDS = [name for name, why in ck.available_backends(DEVICE).items()
                  if why is None and name != "reference"]


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name, why in ck.available_backends(DEVICE).items():
        lines.append(f"backend {name} on {DEVICE}: {'available' if why is None else 'unavailable: ' + why}")
    return lines


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
