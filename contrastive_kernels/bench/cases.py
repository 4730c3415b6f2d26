"""Benchmark cases: what is run (op, shape, dtype), its FLOP model, and how to build one step.

FLOP models (DESIGN.md, fixed so that less recomputation shows as more speed):
  bank mode (queue without gradient) 6*B*K*D; in-batch with gradients to both sides 8*B*N*D;
  symmetric CLIP 8*N*N*D; top-k 2*M*N*D. A mixing case counts its bank-mode loss only.
  ``topk_host`` is top-k with the bank in pinned host memory and the queries on the GPU; its
  rows also report the bank's streaming rate against the host-to-device bandwidth measured in
  the same run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str              # info_nce_bank | info_nce_in_batch | clip | nt_xent | topk | topk_host | mixing
    shape: Tuple[Tuple[str, int], ...]
    dtype: str = "fp32"
    label: str = ""      # the preset's name for it (moco, qk, ...)

    @property
    def dims(self) -> Dict[str, int]:
        return dict(self.shape)

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape)

    @property
    def flops(self) -> float:
        d = self.dims
        if self.op in ("info_nce_bank", "mixing"):
            return 6.0 * d["B"] * d["K"] * d["D"]
        if self.op == "info_nce_in_batch":
            return 8.0 * d["B"] * d["B"] * d["D"]
        if self.op == "clip":
            return 8.0 * d["N"] * d["N"] * d["D"]
        if self.op == "nt_xent":
            n = 2 * d["B"]
            return 8.0 * n * n * d["D"]
        if self.op in ("topk", "topk_host"):
            return 2.0 * d["M"] * d["N"] * d["D"]
        raise ValueError(self.op)

    @property
    def negatives(self) -> int:
        """The x axis of the plots: negatives per row (or bank rows for top-k)."""
        d = self.dims
        return d.get("K") or d.get("N") or 2 * d.get("B", 0)

    def eager_bytes(self) -> int:
        """Rough extra memory of the eager reference (the score matrix and its copies), used to
        skip cases that cannot fit."""
        d = self.dims
        item = 4  # logits are upcast to fp32
        if self.op in ("info_nce_bank", "mixing"):
            return 5 * d["B"] * d["K"] * item
        if self.op == "info_nce_in_batch":
            return 6 * d["B"] * d["B"] * item
        if self.op == "clip":
            return 8 * d["N"] * d["N"] * item
        if self.op == "nt_xent":
            return 8 * (2 * d["B"]) ** 2 * item
        if self.op in ("topk", "topk_host"):
            return 3 * d["M"] * d["N"] * item
        return 0

    def bank_bytes(self) -> int:
        """Bytes of the bank (what a host-resident bank streams over PCIe per call)."""
        d = self.dims
        return d["N"] * d["D"] * torch.finfo(DTYPES[self.dtype]).bits // 8 if "N" in d else 0


def case(op, dtype="fp32", label="", **shape) -> Case:
    return Case(op, tuple(shape.items()), dtype, label)


PRESETS: Dict[str, List[Case]] = {
    # the CPU table of README.md: MoCo and QK shapes, fp32
    "cpu": [case("info_nce_bank", B=256, K=65536, D=128, label="moco"),
            case("info_nce_bank", B=256, K=2**20, D=128, label="qk")],
    "cpu-sweep": [case("info_nce_bank", B=256, K=k, D=128, label="sweep")
                  for k in (4096, 16384, 65536, 262144, 2**20)],
    "cpu-quick": [case("info_nce_bank", B=64, K=8192, D=32, label="quick"),
                  case("clip", N=512, D=32, label="quick"),
                  case("topk", M=64, N=16384, D=32, k=16, label="quick")],
    "moco": [case("info_nce_bank", dt, B=256, K=65536, D=128, label="moco") for dt in ("bf16", "fp32")],
    "qk": [case("info_nce_bank", "bf16", B=b, K=2**20, D=d, label="qk") for b in (1024, 4096) for d in (128, 256)],
    "clip": [case("clip", "bf16", N=n, D=d, label="clip") for n in (16384, 32768, 65536) for d in (512, 768)],
    "simclr": [case("nt_xent", "bf16", B=4096, D=128, label="simclr")],
    "mining": [case("topk", dt, M=8192, N=n, D=128, k=kk, label="mining")
               for dt in ("fp16", "bf16", "fp32") for n in (2**20, 2**22) for kk in (16, 128, 1024)],
    # the bank in pinned host memory (50M x 128 fp16 = 12.8 GB), streamed through the GPU
    "mining-host": [case("topk_host", "fp16", M=m, N=50_000_000, D=128, k=kk, label="mining-host")
                    for m in (1024, 8192) for kk in (16, 128)],
    # MoCHi at the MoCo shape and with a 2^20 bank, next to plain InfoNCE at the same B, K, D (the
    # "vs_plain" column: mixing time / plain InfoNCE time of the same backend)
    "mixing": [c for k in (65536, 2**20)
               for c in (case("info_nce_bank", "bf16", B=256, K=k, D=128, label="mochi"),
                         case("mixing", "bf16", B=256, K=k, D=128, n_hard=1024, s=512, s_q=256,
                              label="mochi"))],
    "gpu-sweep": [case("info_nce_bank", "bf16", B=1024, K=k, D=128, label="sweep")
                  for k in (16384, 65536, 262144, 2**20, 2**22)],
    # the same MoCHi case on the CPU backends (fp32; eager MoCHi and plain InfoNCE beside it)
    "cpu-mixing": [case("info_nce_bank", B=256, K=65536, D=128, label="mochi"),
                   case("mixing", B=256, K=65536, D=128, n_hard=1024, s=512, s_q=256, label="mochi")],
}
PRESETS["gpu"] = (PRESETS["moco"] + PRESETS["qk"] + PRESETS["clip"] + PRESETS["simclr"]
                  + PRESETS["mixing"] + PRESETS["gpu-sweep"])
# sized for a GPU: hours (and, for the eager rows, more memory than a workstation has) on a CPU
GPU_PRESETS = ("moco", "qk", "clip", "simclr", "mining", "mining-host", "mixing", "gpu-sweep", "gpu")


# Outside candidates (Inf-CL, FAISS, a hand-written torch top-k, ...): name -> builder(case, device)
# returning a step callable, or None when the candidate does not support the case's device or
# dtype. Modules bench/baselines_*.py register themselves with ``register_baseline``, naming the
# ops they can run at all: builders are only called for those (a preset's other ops get no row
# for them rather than a failed one).
BASELINES: Dict[str, Callable[[Case, str], Optional[Callable[[], None]]]] = {}
BASELINE_OPS: Dict[str, Tuple[str, ...]] = {}


def register_baseline(name: str, ops: Tuple[str, ...]):
    def deco(builder):
        BASELINES[name] = builder
        BASELINE_OPS[name] = tuple(ops)
        return builder
    return deco


def applies(backend: str, op: str) -> bool:
    """False for an outside candidate that cannot run ``op`` (e.g. FAISS on a loss case)."""
    _load_baselines()
    return backend not in BASELINE_OPS or op in BASELINE_OPS[backend]


def _load_baselines():
    import importlib
    import pkgutil

    from contrastive_kernels import bench

    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("baselines_"):
            importlib.import_module(f"contrastive_kernels.bench.{info.name}")


def _unit(rows, dim, gen, dtype, device, requires_grad=False):
    x = F.normalize(torch.randn(rows, dim, generator=gen), dim=1).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def build_step(c: Case, backend: str, device: str) -> Tuple[Callable[[], None], List[torch.Tensor]]:
    """A zero-argument callable running one forward (+ backward) of case ``c`` with ``backend``
    ("compile" = torch.compile of the eager reference), and the input tensors it uses."""
    import contrastive_kernels as ck
    from contrastive_kernels import reference

    _load_baselines()
    if backend in BASELINES:
        step = BASELINES[backend](c, device) if applies(backend, c.op) else None
        if step is None:
            raise NotImplementedError(f"{backend} does not run {c.op} in {c.dtype} on {device}")
        return step, []
    gen = torch.Generator().manual_seed(0)
    dtype, d = DTYPES[c.dtype], c.dims

    def api(fn, **kw):
        if backend == "compile":
            ref = getattr(reference, fn.__name__)
            return torch.compile(functools.partial(ref, **kw), dynamic=False)
        return functools.partial(fn, backend=backend, **kw)

    if c.op in ("info_nce_bank", "mixing"):
        q = _unit(d["B"], d["D"], gen, dtype, device, True)
        k = _unit(d["B"], d["D"], gen, dtype, device)
        queue = _unit(d["K"], d["D"], gen, dtype, device)
        kw = dict(temperature=0.07)
        if c.op == "mixing":
            kw["mixing"] = ck.Mixing(d["n_hard"], d["s"], d["s_q"], torch.Generator(device).manual_seed(0))
        fn = api(ck.info_nce, **kw)
        return _train_step(lambda: fn(q, k, queue), [q]), [q, k, queue]
    if c.op == "info_nce_in_batch":
        q = _unit(d["B"], d["D"], gen, dtype, device, True)
        k = _unit(d["B"], d["D"], gen, dtype, device, True)
        fn = api(ck.info_nce, temperature=0.07)
        return _train_step(lambda: fn(q, k), [q, k]), [q, k]
    if c.op == "clip":
        img = _unit(d["N"], d["D"], gen, dtype, device, True)
        txt = _unit(d["N"], d["D"], gen, dtype, device, True)
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        fn = api(ck.clip_loss)
        return _train_step(lambda: fn(img, txt, scale), [img, txt, scale]), [img, txt]
    if c.op == "nt_xent":
        z1 = _unit(d["B"], d["D"], gen, dtype, device, True)
        z2 = _unit(d["B"], d["D"], gen, dtype, device, True)
        fn = api(ck.nt_xent, temperature=0.1)
        return _train_step(lambda: fn(z1, z2), [z1, z2]), [z1, z2]
    if c.op == "topk":
        q = _unit(d["M"], d["D"], gen, dtype, device)
        bank = _unit(d["N"], d["D"], gen, dtype, device)
        fn = api(ck.topk_similarity)
        return (lambda: fn(q, bank, d["k"])), [q, bank]
    if c.op == "topk_host":
        q = _unit(d["M"], d["D"], gen, dtype, device)
        bank = host_bank(d["N"], d["D"], dtype, device)
        fn = api(ck.topk_similarity)
        return (lambda: fn(q, bank, d["k"])), [q]
    raise ValueError(f"unknown op {c.op}")


_HOST_BANKS: Dict[Tuple, torch.Tensor] = {}


def host_bank(n: int, dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The unit-row bank of the host-resident cases, in pinned host memory when ``device`` is a
    GPU, built once per process (a 50M-row bank takes about a minute) in 1M-row slices."""
    key = (n, dim, dtype, device.startswith("cuda"))
    if key not in _HOST_BANKS:
        _HOST_BANKS.clear()
        pinned = device.startswith("cuda") and torch.cuda.is_available()
        bank = torch.empty((n, dim), dtype=dtype, pin_memory=pinned)
        gen = torch.Generator().manual_seed(1)
        for j0 in range(0, n, 1 << 20):
            j1 = min(n, j0 + (1 << 20))
            bank[j0:j1] = _unit(j1 - j0, dim, gen, dtype, "cpu")
        _HOST_BANKS[key] = bank
    return _HOST_BANKS[key]


def _train_step(forward: Callable[[], torch.Tensor], leaves: List[torch.Tensor]):
    def step():
        for t in leaves:
            t.grad = None
        forward().backward()
    return step


# Top-k mining on the CPU (issue 6): the C++ backend against FAISS's exact flat index
# (bench/baselines_faiss_cpu.py) and the chunked torch backend. The eager reference would sort a
# 1024 x 2^20 score matrix (12 GiB): run it with --backends cpu,chunked,faiss_cpu.
PRESETS["cpu-topk"] = [case("topk", M=1024, N=2**20, D=128, k=64, label="mining")]
