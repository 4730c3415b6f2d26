# The two commands of README.md: `make demo` (the main job) and `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
export PYTHONUNBUFFERED := 1

NVCC ?= nvcc
CUDA_CHECK_ARCHS ?= sm_80 sm_90a
# the half-precision restrictions torch.utils.cpp_extension compiles CUDA sources with
CUDA_CHECK_FLAGS ?= -std=c++17 -O3 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
# 1 when a C++ compiler exists: the csrc extension must then build (and its backend must load in
# the tests); 0 where there is none: the pure-Python package installs and tests without it.
HAVE_CXX := $(shell command -v $${CXX:-c++} >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: install build-ext test test-gpu test-cuda-emulated test-slow demo bench bench-gpu cuda-check clean

# Installs what the project needs on a fresh machine: torch only if missing (pinned CPU wheel
# where there is no GPU), then this package and its test/demo extras against that torch, then the
# C++ extension (csrc/) in place (see build-ext).
install:
	PY=$(PY) bash scripts/ensure_torch.sh
	CK_BUILD_EXT=0 $(PIP) install --no-build-isolation -q -e ".[test,demo]"
	$(MAKE) --no-print-directory build-ext PY=$(PY)

# The compiled kernels (contrastive_kernels/_C*.so) with torch.utils.cpp_extension + ninja,
# incremental in ./build. CUDA kernels too where torch has CUDA and nvcc is found.
build-ext:
	CK_BUILD_EXT=$(HAVE_CXX) $(PY) setup.py -q build_ext --inplace

# CPU test suite (CI): every backend against reference.py (backend="cpu" included once the
# extension is built); Triton runs through its interpreter.
test: install
	CK_REQUIRE_EXT=$(HAVE_CXX) TRITON_INTERPRET=1 $(PY) -m pytest -m "not gpu and not slow" -q

# Compiles every CUDA kernel (device code and launchers, no torch headers) with nvcc for each
# architecture of CUDA_CHECK_ARCHS: csrc/cuda/kernels_*.cu hold every configuration launched.
cuda-check:
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: $(NVCC) not found"; exit 1; }
	@for arch in $(CUDA_CHECK_ARCHS); do for f in csrc/cuda/kernels_*.cu; do echo "$$arch $$f"; done; done | \
	  xargs -P $$(nproc) -n 2 sh -c '$(NVCC) $(CUDA_CHECK_FLAGS) -arch=$$0 -Icsrc -c $$1 -o /dev/null && echo "ok  $$0 $$1"'

# The real CUDA build of the extension without a GPU: torch's CUDA wheel of the installed version
# (PyPI, into a venv under ~/.cache; ~5 GB, reused) builds contrastive_kernels._C with every
# csrc/cuda glue file against ATen/c10's CUDA headers, then the build is loaded and checked (ops
# registered for CPU and CUDA, its CPU kernels against reference.py). SKIPPED without nvcc or network.
.PHONY: cuda-build-check
cuda-build-check:
	PY=$(PY) bash scripts/cuda_build_check.sh

# The long CPU tests left out of `make test`.
test-slow: install
	TRITON_INTERPRET=1 $(PY) -m pytest -m "slow and not gpu" -q

# On the GPU machine: the suite on CUDA (big shapes, bf16, opcheck, torch.compile).
test-gpu:
	$(PY) -m pytest -m gpu -q -rs

# The CUDA backend's suite (tests/test_gpu_cuda.py) on the host CUDA emulator of csrc/emu (also
# part of `make test`).
test-cuda-emulated: install
	$(PY) -m pytest tests/test_gpu_cuda.py -m "not gpu" -q

# The main job: the default training run (MoCo on digits) with eager and fused losses side by side.
demo: install
	$(PY) -m contrastive_kernels.train --compare reference,auto --out runs/demo

bench: install
	$(PY) -m contrastive_kernels.bench --preset cpu --out benchmarks/results/cpu

bench-gpu:
	$(PY) -m contrastive_kernels.bench --preset gpu --out benchmarks/results/gpu

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis contrastive_kernels/_C*.so

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

# Distributed losses on CPU with gloo: per-rank time and peak memory for world 1, 2, 4 (both
# strategies), and the torchrun DDP example.
.PHONY: bench-distributed example-ddp
bench-distributed:
	$(PY) -m contrastive_kernels.bench.distributed --out benchmarks/results/distributed/fixed_global_batch
	$(PY) -m contrastive_kernels.bench.distributed --local-batch 1024 --no-single --out benchmarks/results/distributed/fixed_local_batch

example-ddp:
	torchrun --standalone --nproc_per_node 2 examples/ddp_infonce.py --check

# Hard-negative mixing (issue 5), on the GPU machine: the mixing preset (MoCHi at B=256, D=128,
# n_hard=1024, s=512, s'=256, K=65536 and 2^20, bf16) next to plain fused InfoNCE at the same
# shapes (the vs_plain ratio), the hard negatives from the loss pass against the separate top-k
# (triton-separate-topk), mixed_lse against mixed_dots (triton-mixed-dots), the cuda backend,
# eager MoCHi and the eager/compiled reference; then the GPU mixing tests.
.PHONY: bench-mixing-gpu
bench-mixing-gpu:
	$(PY) -m contrastive_kernels.bench --preset mixing --backends triton,triton-separate-topk,triton-mixed-dots,cuda,cuda-mixed-dots,eager-mochi,reference,compile --repeats 10 --out benchmarks/results/gpu-mixing
	$(PY) -m pytest -m gpu -q -rs tests/test_gpu_mixing.py
