"""pytest-benchmark suites over the same cases as ``python -m contrastive_kernels.bench``.

  pytest benchmarks/ --benchmark-only                        # CPU quick preset
  CK_BENCH_PRESET=gpu pytest benchmarks/ --benchmark-only    # on a GPU machine

Each benchmark records the case's effective TFLOP/s (DESIGN.md's FLOP models) in extra_info.
"""
import os

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels.bench.cases import PRESETS, build_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = os.environ.get("CK_BENCH_PRESET", "gpu" if DEVICE == "cuda" else "cpu-quick")
BACKENDS = ["reference"] + [n for n, why in ck.available_backends(DEVICE).items()
                            if why is None and n != "reference"
                            and not (n == "triton" and DEVICE == "cpu")]  # no interpreter timing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PRESETS[PRESET], ids=lambda c: f"{c.label}-{c.op}-{c.shape_str}-{c.dtype}")
def test_case(benchmark, case, backend):
    step, _ = build_step(case, backend, DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        step()
        sync()

    run()  # warm-up (compilation, autotuning)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["flops"] = case.flops
    benchmark.extra_info["eff_tflops"] = case.flops / benchmark.stats.stats.median / 1e12
