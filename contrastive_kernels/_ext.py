"""Loads the compiled csrc extension (the torch.ops.contrastive_kernels C++/CUDA ops), or says why
it is unavailable; registers the ops' fake kernels (torch.compile / meta tracing) and autograd
formulas.

Where the extension comes from, in order:
1. ``contrastive_kernels._C``, built ahead of time by setup.py (``pip install --no-build-isolation
   -e .`` or ``python setup.py build_ext --inplace``);
2. a JIT build with ``torch.utils.cpp_extension.load`` from the csrc/ sources next to the package
   (a source checkout; the first call compiles for a minute or two, later ones reuse
   ~/.cache/torch_extensions). ``CK_JIT=0`` turns this off.
Neither: ``unavailable_reason()`` says why, backends "cpu" and "cuda" report it through
``available()``, and ``backend="auto"`` runs the chunked (pure PyTorch) backend instead.

Autograd: ``lse_fwd`` is differentiable in every input that may carry a gradient (q, k,
row_scale, col_scale, row_bias, col_bias), by the formulas of ``reference.lse_stats`` (row-only
mode: O(BD) from the saved softmax-weighted key sums; else ``lse_bwd``, a second fused pass).
``mixed_dots`` is differentiable in q. The other ops return no gradient.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import sys
import threading
import time
from typing import Optional

import torch

from ._common import first_order, mixed_lse_backward, mixed_lse_outputs, mixed_lse_setup_context, times_gammas
from ._files import atomic_write_text

_lock = threading.Lock()
_module = None
_reason: Optional[str] = None
_loaded = False
_cuda_kernels = False  # read once at load: torch.compile cannot trace the pybind build_info call
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK = "backend='auto' uses the 'chunked' backend (pure PyTorch) instead"


def _try_prebuilt():
    try:
        return importlib.import_module("contrastive_kernels._C"), None
    except ImportError as exc:
        return None, f"contrastive_kernels._C is not built ({exc})"


JIT_NAME = "contrastive_kernels_C"
JIT_NOTICE_S = 3.0  # a JIT load still running after this long is compiling: say so
# a build folder whose files have not changed for this long, with no process working in it, was
# left locked by a killed build (torch's lock has no owner and would be waited on forever)
STALE_LOCK_S = float(os.environ.get("CK_JIT_STALE_LOCK_S", "120"))


def _processes_working_in(folder: str) -> bool:
    """Whether a process has ``folder`` as its working directory (torch runs ninja, and ninja the
    compilers, there). Linux only (/proc); processes of other users are not visible."""
    if not os.path.isdir("/proc"):
        return False
    real = os.path.realpath(folder)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == real:
                    return True
            except OSError:
                pass
    return False


def _newest_change(folder: str) -> float:
    times = [os.stat(folder).st_mtime]
    for entry in os.scandir(folder):
        try:
            times.append(entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            pass
    return max(times)


def wait_for_build_lock(folder: str, stale_s: float = STALE_LOCK_S, poll_s: float = 1.0) -> bool:
    """Wait while another process builds the extension in ``folder`` (its ``lock`` file exists);
    remove a lock left by a killed build instead of waiting for it forever: one whose folder has
    not changed for ``stale_s`` seconds while no process works in it. True if a lock was removed."""
    lock = os.path.join(folder, "lock")
    told = False
    while os.path.exists(lock):
        try:
            idle = time.time() - _newest_change(folder)
        except OSError:  # the folder or lock went away meanwhile
            time.sleep(poll_s)
            continue
        if idle > stale_s and not _processes_working_in(folder):
            try:
                os.unlink(lock)
            except FileNotFoundError:
                return False
            print(f"contrastive_kernels: removed {lock}, left by a build that was killed "
                  f"(nothing in its folder changed for {idle:.0f} s)", file=sys.stderr)
            return True
        if not told:
            print(f"contrastive_kernels: waiting for another process's build of the extension "
                  f"({lock}; a lock with no build behind it is removed after {stale_s:.0f} s)",
                  file=sys.stderr)
            told = True
        time.sleep(poll_s)
    return False


def _try_jit():
    if os.environ.get("CK_JIT", "1") == "0":
        return None, "JIT compilation is off (CK_JIT=0)"
    if not os.path.isdir(os.path.join(_SOURCE_ROOT, "csrc")):
        return None, "no csrc/ sources next to the package for a JIT build"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx}) for a JIT build"
    try:
        from torch.utils import cpp_extension

        from . import _build

        with_cuda = _jit_with_cuda()
        kw = _build.extension_kwargs(_SOURCE_ROOT, with_cuda)
        flags = kw["extra_compile_args"]
        stamp = _jit_stamp()
        folder = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
        wait_for_build_lock(folder)
        # a load that rebuilds and dies before its end must not leave the old stamp next to the new build
        _remove_jit_stamp_unless(folder, stamp)
        # said only when the load takes a while: a cached build loads in a second or two
        notice = threading.Timer(JIT_NOTICE_S, print, ("contrastive_kernels: compiling the C++ "
                                 "extension (JIT, on first use and after source changes; a few "
                                 "minutes)...",), {"file": sys.stderr, "flush": True})
        notice.daemon = True
        notice.start()
        try:
            mod = cpp_extension.load(
                name=JIT_NAME, sources=kw["sources"], extra_include_paths=kw["include_dirs"],
                extra_cflags=flags["cxx"] if isinstance(flags, dict) else flags,
                extra_cuda_cflags=flags["nvcc"] if isinstance(flags, dict) else None,
                extra_ldflags=kw["extra_link_args"], with_cuda=with_cuda, verbose=False)
        finally:
            notice.cancel()
        _write_jit_stamp(folder, stamp)
        return mod, None
    except Exception as exc:  # noqa: BLE001 - any build failure becomes the reason
        first = str(exc).strip().splitlines()
        return None, f"the JIT build failed ({type(exc).__name__}: {first[-1] if first else ''})"


JIT_STAMP = "contrastive_kernels_config.json"  # next to the JIT build: what it was built from


def _jit_with_cuda() -> bool:
    from torch.utils import cpp_extension

    return (os.environ.get("CK_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
            and cpp_extension.CUDA_HOME is not None)


def _jit_stamp() -> dict:
    """What a JIT build is made from, as far as it can be read without starting CUDA (the
    import reads it; a process that started CUDA cannot fork workers that use it): sources,
    flags, the CUDA choice and toolkit, TORCH_CUDA_ARCH_LIST. torch itself rebuilds on any change
    of these, or of the GPU's architecture."""
    from torch.utils import cpp_extension

    from . import _build

    with_cuda = _jit_with_cuda()
    return {"with_cuda": with_cuda, "sources": _build.sources(_SOURCE_ROOT, with_cuda),
            "cxx": _build.cxx_flags(), "nvcc": _build.nvcc_flags() if with_cuda else [],
            "cuda_home": cpp_extension.CUDA_HOME, "torch_cuda": torch.version.cuda,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "")}


def _read_jit_stamp(folder: str):
    try:
        with open(os.path.join(folder, JIT_STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_jit_stamp_unless(folder: str, stamp: dict) -> None:
    if _read_jit_stamp(folder) not in (None, stamp):
        try:
            os.unlink(os.path.join(folder, JIT_STAMP))
        except OSError:
            pass


def _write_jit_stamp(folder: str, stamp: dict) -> None:
    """Records what the build just loaded was made from, for jit_build_cached."""
    try:
        atomic_write_text(os.path.join(folder, JIT_STAMP), json.dumps(stamp, sort_keys=True))
    except OSError:  # a read-only cache: the import then leaves the load to the first use
        pass


def jit_build_cached() -> bool:
    """Whether torch's extension cache holds an up-to-date JIT build of the extension (newer than
    every file under csrc/, built from the same sources and flags, no build under way): loading it
    then takes a fraction of a second. A stale one (a pull that changed csrc/, CK_BUILD_CUDA
    changed) would rebuild for minutes: that waits for the first use, not the import."""
    csrc = os.path.join(_SOURCE_ROOT, "csrc")
    if os.environ.get("CK_JIT", "1") == "0" or not os.path.isdir(csrc):
        return False
    try:
        from torch.utils import cpp_extension

        folder = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
        built = os.path.getmtime(os.path.join(folder, JIT_NAME + ".so"))
        if os.path.exists(os.path.join(folder, "lock")):
            return False
        newest = max((os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(csrc) for f in files),
                     default=0.0)
        if built < newest:
            return False
        return _read_jit_stamp(folder) == _jit_stamp()
    except Exception:  # noqa: BLE001 - no cache folder or no build in it: nothing cached
        return False


def load():
    """The extension module (build info functions; its import registered the ops), or None."""
    global _module, _reason, _loaded, _cuda_kernels
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        mod, why = _try_prebuilt()
        if mod is None:
            mod, why_jit = _try_jit()
            why = None if mod is not None else f"{why}; {why_jit}"
        if mod is not None:
            try:
                register_python_parts("contrastive_kernels")
            except Exception as exc:  # noqa: BLE001
                mod, why = None, f"registering the ops' autograd/fake kernels failed ({exc})"
        _cuda_kernels = mod is not None and mod.build_info()["cuda"] != "not built"
        _module, _reason, _loaded = mod, (None if mod is not None else f"{why}. {FALLBACK}"), True
        return _module


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why not (and which backend runs instead)."""
    load()
    return _reason


def build_info() -> dict:
    """Compiler, flags, OpenMP, CPU instruction sets (compiled / supported / in use) and the CUDA
    build (version and architectures, or 'not built'); {'available': False, 'reason': ...}
    without the extension."""
    mod = load()
    if mod is None:
        return {"available": False, "reason": _reason}
    from . import _build

    info = dict(mod.build_info())
    info["available"] = True
    info["cxx_flags"] = " ".join(_build.cxx_flags())
    info["module"] = mod.__name__
    info["cuda"] = info["cuda"].replace("cuda", "").replace("_", ".") if info["cuda"] != "not built" else info["cuda"]
    return info


def has_cuda_kernels() -> bool:
    load()
    return _cuda_kernels


def set_cpu_isa(name: str) -> bool:
    """Run the CPU kernels with one instruction set: 'generic', 'avx2', 'avx512' or 'auto'
    (the widest the CPU has). False if the CPU lacks it. Mainly for tests."""
    mod = load()
    return bool(mod is not None and mod.set_cpu_isa(name))


def cpu_fma_peak(seconds: float = 0.5) -> Optional[dict]:
    """The fp32 fused-multiply-add throughput of the CPU kernels' instruction set, measured on all
    of torch's threads at once for about ``seconds``: {'isa', 'threads', 'gflops',
    'gflops_one_thread', 'check', 'check_one_thread'} ('check' is 12.0 once the FMA chains have
    converged, after a few thousand steps: a sign that every thread ran the whole loop), or None
    without the extension. The arithmetic peak the `cpu` backend's figures are measured against:
    torch.mm's rate is not one where torch's BLAS does not use the widest FMA units."""
    mod = load()
    return None if mod is None else dict(mod.cpu_fma_peak(float(seconds)))


# --------------------------------------------------------------------------------------------
# fake kernels and autograd (registered once, after the library is loaded)
# --------------------------------------------------------------------------------------------


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_python_parts(lib: str):
    """The fake kernels and autograd of the ops of namespace ``lib``: "contrastive_kernels", or
    the CUDA emulator's test build, whose ops have the same schemas (tests/_cuda_emu.py)."""
    ns = getattr(torch.ops, lib)

    @torch.library.register_fake(f"{lib}::lse_fwd")
    def _lse_fwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                      want_col_lse, row_only):
        acc = _acc(q.dtype)
        b, d = q.shape
        n = k.shape[0]
        g = len(gammas)
        e_key = q.new_empty((g, b, d) if row_only else (0,), dtype=acc)
        p_key = q.new_empty((b, d) if (row_only and q_labels is not None) else (0,), dtype=acc)
        return (q.new_empty((g, b), dtype=acc), q.new_empty((b,), dtype=acc), q.new_empty((b,), dtype=acc),
                q.new_empty((n if want_col_lse else 0,), dtype=acc), e_key, p_key)

    @torch.library.register_fake(f"{lib}::lse_topk_fwd")
    def _lse_topk_fwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                           want_col_lse, row_only, threshold, capacity, n_best):
        b = q.shape[0]
        return _lse_fwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                             want_col_lse, row_only) + (q.new_empty((b, n_best), dtype=torch.int64),
                                                        q.new_empty((b,), dtype=torch.int64))

    @torch.library.register_fake(f"{lib}::lse_bwd")
    def _lse_bwd_fake(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                      row_lse, col_lse, d_row, d_pos, d_col, need_g_key, need_h, need_dc, need_dd):
        acc = _acc(q.dtype)
        b, d = q.shape
        n = k.shape[0]
        return (q.new_empty((b, d) if need_g_key else (0,), dtype=acc),
                q.new_empty((n, d) if need_h else (0,), dtype=acc),
                q.new_empty((b,) if need_dc else (0,), dtype=acc),
                q.new_empty((n,) if need_dd else (0,), dtype=acc))

    @torch.library.register_fake(f"{lib}::topk")
    def _topk_fake(query, bank, k, similarity, exclude_index, query_labels, bank_labels):
        m = query.shape[0]
        return query.new_empty((m, k), dtype=torch.float32), query.new_empty((m, k), dtype=torch.int64)

    @torch.library.register_fake(f"{lib}::mix")
    def _mix_fake(query, negatives, hard_index, pair_index, alpha, query_index, query_weight):
        return query.new_empty((query.shape[0], pair_index.shape[1] + query_index.shape[1], query.shape[1]))

    @torch.library.register_fake(f"{lib}::mixed_dots")
    def _mixed_dots_fake(q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight):
        return q.new_empty((q.shape[0], pair_index.shape[1] + query_index.shape[1]), dtype=_acc(mix_query.dtype))

    @torch.library.register_fake(f"{lib}::mixed_dots_bwd")
    def _mixed_dots_bwd_fake(grad, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight):
        return mix_query.new_empty(mix_query.shape, dtype=_acc(mix_query.dtype))

    torch.library.register_autograd(f"{lib}::lse_fwd", functools.partial(_lse_fwd_backward, ns),
                                    setup_context=_lse_fwd_setup)
    @torch.library.register_fake(f"{lib}::mixed_lse")
    def _mixed_lse_fake(q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight,
                        row_scale, row_bias, gammas):
        return mixed_lse_outputs(q, mix_query, gammas)

    torch.library.register_autograd(f"{lib}::mixed_lse", mixed_lse_backward, setup_context=mixed_lse_setup_context)
    # lse_topk_fwd: lse_fwd's formula; its 3 extra inputs and 2 extra outputs carry no gradient
    torch.library.register_autograd(f"{lib}::lse_topk_fwd", functools.partial(_lse_topk_fwd_backward, ns),
                                    setup_context=_lse_topk_fwd_setup)
    torch.library.register_autograd(f"{lib}::mixed_dots", functools.partial(_mixed_dots_backward, ns),
                                    setup_context=_mixed_dots_setup)


def _lse_fwd_setup(ctx, inputs, output):
    q, k, a, b, c, d, gammas, exclude, q_labels, k_labels, want_col_lse, row_only = inputs
    row_lse, pos_sum, pos_count, col_lse, e_key, p_key = output
    ctx.gammas = tuple(float(g) for g in gammas)
    ctx.want_col_lse, ctx.row_only = bool(want_col_lse), bool(row_only)
    ctx.has_labels = q_labels is not None
    ctx.in_dtypes = [t.dtype if t is not None else None for t in (q, k, a, b, c, d)]
    ctx.mark_non_differentiable(pos_count, e_key, p_key)
    ctx.set_materialize_grads(False)  # unused outputs get None, not zero-filled gradients
    if row_only:
        ctx.save_for_backward(q, a, e_key, p_key, pos_count, row_lse)
    else:
        ctx.save_for_backward(q, k, a, b, c, d, exclude, q_labels, k_labels, row_lse, col_lse)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


@first_order("backend='cpu' / 'cuda'")
def _lse_fwd_backward(ns, ctx, d_row, d_pos, _d_count, d_col, _d_e, _d_p):
    need = ctx.needs_input_grad
    gammas = ctx.gammas
    dt = ctx.in_dtypes
    if ctx.row_only:
        if need[1] or need[3] or need[5]:
            raise RuntimeError("contrastive_kernels::lse_fwd was called with row_only=True, which computes no "
                               "key-side gradient (k, col_scale, col_bias); call it with row_only=False")
        q, a, e_key, p_key, pos_count, row_lse = ctx.saved_tensors
        acc = row_lse.dtype
        if d_row is None:
            d_row = torch.zeros_like(row_lse)
        w = times_gammas(d_row.to(acc), gammas)  # (G, B)
        g_key = (w[..., None] * e_key).sum(0)  # sum_j G_ij b_j k_j
        g_sum = (w * (row_lse != float("-inf")).to(acc)).sum(0)
        if ctx.has_labels and d_pos is not None:
            g_key = g_key + d_pos.to(acc)[:, None] * p_key
            g_sum = g_sum + d_pos.to(acc) * pos_count
        qf = q.to(acc)
        dq = _cast(a.to(acc)[:, None] * g_key, dt[0]) if need[0] else None
        da = _cast((qf * g_key).sum(1), dt[2]) if need[2] else None
        dc = _cast(g_sum, dt[4]) if need[4] else None
        return dq, None, da, None, dc, None, None, None, None, None, None, None

    q, k, a, b, c, d, exclude, q_labels, k_labels, row_lse, col_lse = ctx.saved_tensors
    acc = row_lse.dtype
    if d_row is None:
        d_row = torch.zeros_like(row_lse)
    need_g = need[0] or need[2]
    need_h = need[1] or need[3]
    g_key, h, dc, dd = ns.lse_bwd(
        q, k, a, b, c, d, list(gammas), exclude, q_labels, k_labels, row_lse, col_lse, d_row.to(acc),
        d_pos.to(acc) if (ctx.has_labels and d_pos is not None) else None,
        d_col.to(acc) if (ctx.want_col_lse and d_col is not None) else None,
        need_g, need_h, bool(need[4]), bool(need[5]))
    dq = _cast(a.to(acc)[:, None] * g_key, dt[0]) if need[0] else None
    da = _cast((q.to(acc) * g_key).sum(1), dt[2]) if need[2] else None
    dk = None
    if need[1]:
        dk = _cast(h * b.to(acc)[:, None] if b is not None else h, dt[1])
    db = _cast((h * k.to(acc)).sum(1), dt[3]) if need[3] else None
    dc_out = _cast(dc, dt[4]) if need[4] else None
    dd_out = _cast(dd, dt[5]) if need[5] else None
    return dq, dk, da, db, dc_out, dd_out, None, None, None, None, None, None


def _lse_topk_fwd_setup(ctx, inputs, output):
    _lse_fwd_setup(ctx, inputs[:12], output[:6])
    # one call marks them all (a second call would replace the first's list)
    ctx.mark_non_differentiable(output[2], output[4], output[5], output[6], output[7])


def _lse_topk_fwd_backward(ns, ctx, d_row, d_pos, d_count, d_col, d_e, d_p, _d_best, _d_cnt):
    return _lse_fwd_backward(ns, ctx, d_row, d_pos, d_count, d_col, d_e, d_p) + (None, None, None)


def _mixed_dots_setup(ctx, inputs, output):
    q, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight = inputs
    ctx.set_materialize_grads(False)
    ctx.q_dtype = q.dtype
    ctx.save_for_backward(mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight)


@first_order("backend='cpu' / 'cuda'")
def _mixed_dots_backward(ns, ctx, grad):
    saved = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad is None:
        return (None,) * 8
    dq = ns.mixed_dots_bwd(grad, *saved)
    return (dq.to(ctx.q_dtype),) + (None,) * 7
