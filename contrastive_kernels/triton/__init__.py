"""The Triton backend: one module per kernel family (infonce.py, topk.py, mixing.py), each
exposing the family ops of ``losses.py``. On CUDA tensors it runs compiled; on CPU tensors only
through Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is
for correctness tests on small shapes, never for speed."""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

import triton  # noqa: F401  (ImportError here marks the backend unavailable)

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels' tl.dot takes for features of ``dtype``: bf16 goes through fp32 under
    the interpreter, whose bf16 tl.dot multiplies bit patterns, not values (an exact upcast; the
    compiled kernels use bf16 tensor cores). One rule for the loss and top-k kernels, so that the
    scores of the loss pass and of the top-k stay the same."""
    return torch.float32 if INTERPRETER and dtype == torch.bfloat16 else dtype


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr_functions since
# Triton 3.5, about 4 us per call from Python: a loss op's launch plan takes a dozen of them.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


try:  # torch >= 2.6: kernels launched through wrap_triton are visible to torch.compile
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover
    def _wrap_triton(kernel):
        return kernel


@functools.lru_cache(maxsize=None)
def launcher(kernel):
    """``wrap_triton(kernel)``, made once per kernel (its checks cost microseconds per launch);
    ``launcher(k)[grid](...)`` launches k, traceably under torch.compile inside a triton_op."""
    return _wrap_triton(kernel)


def available(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        if INTERPRETER:
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu":
        return None if INTERPRETER else ("Triton runs on CPU tensors only through its interpreter: "
                                         "set TRITON_INTERPRET=1 before importing triton")
    return f"Triton does not run on {device.type} tensors"


# Family ops not yet written in Triton fall back to the chunked backend (listed in FALLBACKS so
# that the gap is visible); each kernel module replaces its entry when it lands.
FALLBACKS = []


def _family(module: str, names):
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
        return [getattr(mod, n) for n in names]
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module}":
            raise
        from .. import chunked

        FALLBACKS.extend(names)
        return [getattr(chunked, n) for n in names]


(lse_stats,) = _family("infonce", ["lse_stats"])
from .infonce import PAIRED_DOT_DTYPES, paired_dot  # noqa: E402,F401  (optional: losses._paired_dot)
(topk,) = _family("topk", ["topk"])
mix, mixed_dots = _family("mixing", ["mix", "mixed_dots"])
# optional ops of losses.py: the loss's pass over the queue also yields mixing's hard negatives;
# the synthetic logits reduced to their log-sum-exp in one pass
from .mixing import lse_stats_topk, mixed_lse  # noqa: E402

# lse_stats and lse_stats_topk take row_extra= (one more logit per row, one gamma): InfoNCE's
# positive merged into the queue's log-sum-exp by the kernels (losses.info_nce)
ROW_EXTRA = True
