#!/usr/bin/env bash
# The GPU checks of this project, in stages, for a lent GPU machine with torch + triton + nvcc
# already installed and no package index (the workplace's device tool): run from the repository
# root as `bash scripts/gpu_session.sh STAGE...`. Logs and results go to $OUT (default ./out/gpu)
# as a few files: the device tool returns at most 8 files, so results are packed in one tarball.
#   setup        versions, the Inf-CL wheel from .whl/ (if carried), the C++/CUDA extension (built,
#                and returned as $OUT/ext.tar.gz; a carried .gpubuild/ext.tar.gz is used instead)
#   test         make test-gpu (every test marked gpu), junit XML + log
#   bench-loss   GPU loss presets (moco, qk, simclr; clip with Inf-CL) -> benchmarks/results/gpu-*
#   bench-mixing the mixing preset next to plain fused InfoNCE and eager MoCHi
#   bench-backends  cuda vs triton vs chunked, per op (benchmarks/gpu_backends.py)
#   cuda-kernels the rewritten CUDA kernels against Triton: top-k (warp-owned rows, selection in
#                registers; M=8192, N=2^20, D=128 bf16, k = 16, 128, 256, 1024; fp32 k=64),
#                InfoNCE against a bank (B=1024, K=2^20 and B=256, K=65536), CLIP (N=16384,
#                D=256 and 512) and NT-Xent (B=4096) on the warp kernels (scores and outputs in
#                registers), then the loss cases on the general kernel (CK_CUDA_WARP_KERNELS=0)
#                -> $OUT/cuda-kernels.md
#   profile      host against kernels per training step (scripts/profile_gpu_step.py) for the MoCo,
#                QK and MoCHi steps: wall, kernels, no launches, the CUDA-graph replay, the host's
#                Python profile -> $OUT/profile-*.txt
#   topk         the Triton top-k at N=2^20 fp16, k = 16, 128, 1024 (scripts/bench_topk_gpu.py --quick):
#                the default threshold sample step (topk.sample_factor, chosen with an instruction
#                model) against steps 8, 4 and 2, then the time split of one call -> $OUT/topk.txt
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
PY=${PY:-python3}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
status=0

pack() {  # results directories -> one tarball in $OUT
    tar czf "$OUT/results-$1.tar.gz" "${@:2}" 2>/dev/null || true
}

for stage in "$@"; do
    echo "=== $stage ($(date +%T))"
    case $stage in
    setup)
        { nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"; nvcc --version | tail -2; } > "$OUT/env.txt" 2>&1
        cat "$OUT/env.txt" | tail -4
        if ls .whl/*.whl >/dev/null 2>&1; then
            $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
        fi
        major=$($PY -c "import torch; print(torch.cuda.get_device_capability()[0])")
        arch=$([ "$major" = 9 ] && echo 9.0a || echo "$major.0")
        if [ -f .gpubuild/ext.tar.gz ]; then  # carried from an earlier call's $OUT (same image)
            tar xzf .gpubuild/ext.tar.gz && echo "extension: prebuilt, from .gpubuild/ext.tar.gz"
        else
            CK_BUILD_EXT=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=$arch $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
                || { echo "extension build failed"; tail -30 "$OUT/build.log"; status=1; }
            # back to this machine: carry it as .gpubuild/ext.tar.gz so later calls skip the build
            tar czf "$OUT/ext.tar.gz" contrastive_kernels/_C*.so 2>/dev/null || true
        fi
        ;;
    test)
        # TEST_WORKERS>1 (pytest-xdist): about 3 min on an H100 with 6, but the big-shape tests can
        # then run out of GPU memory side by side; rerun those alone
        $PY -m pytest -m gpu -q -rs -p no:cacheprovider --timeout "${TEST_TIMEOUT:-300}" ${TEST_WORKERS:+-n $TEST_WORKERS} \
            --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -60 || status=1
        ;;
    bench-loss)
        $PY -m contrastive_kernels.bench --preset moco,qk,simclr --out "benchmarks/results/gpu-loss-$GPU" || status=1
        $PY -m contrastive_kernels.bench --preset clip --backends reference,compile,chunked,triton,cuda,infcl \
            --out "benchmarks/results/gpu-clip-$GPU" || status=1
        pack loss "benchmarks/results/gpu-loss-$GPU" "benchmarks/results/gpu-clip-$GPU"
        ;;
    bench-mixing)
        $PY -m contrastive_kernels.bench --preset mixing --backends triton,triton-separate-topk,triton-mixed-dots,cuda,cuda-mixed-dots,eager-mochi,reference,compile \
            --repeats 10 --out "benchmarks/results/gpu-mixing-$GPU" || status=1
        pack mixing "benchmarks/results/gpu-mixing-$GPU"
        ;;
    bench-backends)
        $PY benchmarks/gpu_backends.py --backends cuda,triton,chunked,reference 2>&1 | tee "$OUT/gpu-backends.md" || status=1
        ;;
    cuda-kernels)
        $PY benchmarks/gpu_backends.py --ops topk,bank,clip,ntx --backends cuda,triton 2>&1 | tee "$OUT/cuda-kernels.md" || status=1
        echo "CK_CUDA_WARP_KERNELS=0 (the general lse kernel)" | tee -a "$OUT/cuda-kernels.md"
        CK_CUDA_WARP_KERNELS=0 $PY benchmarks/gpu_backends.py --ops bank,clip,ntx --backends cuda 2>&1 | tee -a "$OUT/cuda-kernels.md" || status=1
        ;;
    profile)
        for c in moco qk mochi; do  # one process per case: a failed graph capture spoils CUDA
            timeout 120 $PY scripts/profile_gpu_step.py --case "$c" --no-launch --cprofile --graph \
                --rows 30 > "$OUT/profile-$c.txt" 2>&1 || status=1
            grep -E "^(case|kernels|no Triton|graph)" "$OUT/profile-$c.txt"
        done
        # the same steps through the custom-op dispatcher (ops._eager_fast off): its host cost
        for c in moco mochi; do
            CK_EAGER_FAST=0 timeout 120 $PY scripts/profile_gpu_step.py --case "$c" --rows 30 \
                > "$OUT/profile-$c-dispatcher.txt" 2>&1 || status=1
            grep -E "^case" "$OUT/profile-$c-dispatcher.txt"
        done
        ;;
    topk)
        $PY scripts/bench_topk_gpu.py --quick --no-torch 2>&1 | tee "$OUT/topk.txt" || status=1
        for f in 8 4 2; do
            echo "CK_TOPK_SAMPLE=$f" | tee -a "$OUT/topk.txt"
            CK_TOPK_SAMPLE=$f $PY scripts/bench_topk_gpu.py --quick --no-torch 2>&1 | tee -a "$OUT/topk.txt" || status=1
        done
        # the X=1 survivor sum against the survivor count + column search it replaced
        echo "CK_TOPK_SURVIVOR_SUM=0" | tee -a "$OUT/topk.txt"
        CK_TOPK_SURVIVOR_SUM=0 $PY scripts/bench_topk_gpu.py --quick --no-torch 2>&1 | tee -a "$OUT/topk.txt" || status=1
        DIAGNOSE=1 DIAGNOSE_K=16,128 $PY scripts/bench_topk_gpu.py 2>&1 | tee -a "$OUT/topk.txt" || status=1
        ;;
    *) echo "unknown stage $stage"; status=2 ;;
    esac
done
exit $status
