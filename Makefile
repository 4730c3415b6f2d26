# The two commands of README.md: `make demo` (the main job) and `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
export PYTHONUNBUFFERED := 1

.PHONY: install test test-gpu test-slow demo bench bench-gpu clean

# Installs what the project needs on a fresh machine: torch only if missing (pinned CPU wheel
# where there is no GPU), then this package and its test/demo extras against that torch.
install:
	PY=$(PY) bash scripts/ensure_torch.sh
	$(PIP) install --no-build-isolation -q -e ".[test,demo]"

# CPU test suite (CI): every backend against reference.py; Triton runs through its interpreter.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not gpu and not slow" -q

# The long CPU tests left out of `make test`.
test-slow: install
	TRITON_INTERPRET=1 $(PY) -m pytest -m "slow and not gpu" -q

# On the GPU machine: the suite on CUDA (big shapes, bf16, opcheck, torch.compile).
test-gpu:
	$(PY) -m pytest -m gpu -q -rs

# The main job: the default training run (MoCo on digits) with eager and fused losses side by side.
demo: install
	$(PY) -m contrastive_kernels.train --compare reference,auto --out runs/demo

bench: install
	$(PY) -m contrastive_kernels.bench --preset cpu --out benchmarks/results/cpu

bench-gpu:
	$(PY) -m contrastive_kernels.bench --preset gpu --out benchmarks/results/gpu

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis

# Triton top-k: ahead-of-time compile report for sm_80/sm_90 (no GPU needed), and on the GPU
# machine the top-k timings (kernel vs its GEMM floor, torch.mm+torch.topk, FAISS if present).
.PHONY: aot-topk bench-topk-gpu
aot-topk:
	$(PY) scripts/triton_aot_topk.py --arch 80,90

bench-topk-gpu:
	$(PY) scripts/bench_topk_gpu.py --out benchmarks/results/gpu-topk
	$(PY) -m contrastive_kernels.bench --preset mining,mining-host --backends triton,torch-topk,gemm-only,faiss-gpu --out benchmarks/results/gpu-mining

# Compile every Triton kernel for sm_80 and sm_90 without a GPU (every autotune config for bf16 and
# fp32 on sm_90, the fallback config otherwise; --full for all) and report registers / spills
# (ptxas -v); fails on a compile error or on a kernel variant with no config that fits in shared
# memory. Needs triton (3.6-3.9), no GPU.
.PHONY: triton-check
triton-check:
	$(PY) scripts/triton_aot_check.py --jobs 2

# Hard-negative mixing (issue 5), on the GPU machine: the mixing preset (MoCHi at B=256, D=128,
# n_hard=1024, s=512, s'=256, K=65536 and 2^20, bf16) next to plain fused InfoNCE at the same
# shapes (the vs_plain ratio), the hard negatives from the loss pass against the separate top-k
# (triton-separate-topk), eager MoCHi and the eager/compiled reference; then the GPU mixing tests.
.PHONY: bench-mixing-gpu
bench-mixing-gpu:
	$(PY) -m contrastive_kernels.bench --preset mixing --backends triton,triton-separate-topk,eager-mochi,reference,compile --repeats 10 --out benchmarks/results/gpu-mixing
	$(PY) -m pytest -m gpu -q -rs tests/test_gpu_mixing.py
