"""The public functions: argument checking, then dispatch to one backend.

Every check of DESIGN.md's "bad input" table lives here, so backends may assume valid input.
Checks that would need a GPU synchronization are not made on the hot path: for CUDA tensors an
invalid *value* (a temperature <= 0 given as a tensor, an out-of-range positive index) turns the
loss into NaN instead of raising; on the CPU they raise.

Backends: "reference" runs ``reference.py`` (the spec); every other backend implements the family
ops of ``losses.py`` and is chosen by ``resolve_backend`` (``backend="auto"`` uses ``AUTO_ORDER``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import threading
from typing import Optional

import torch

from . import losses, reference
from ._common import (BACKENDS, FLOAT_DTYPES, GROUP_STRATEGIES, REDUCTIONS, SIMILARITIES, Mixing,
                      TopK, draw_mixing)

# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------

# module implementing the family ops of each backend (see losses.py for the interface)
BACKEND_MODULES = {
    "chunked": "contrastive_kernels.chunked",
    "triton": "contrastive_kernels.triton",
    "cpu": "contrastive_kernels.cpu_backend",
    "cuda": "contrastive_kernels.cuda_backend",
}

# what backend="auto" tries, in order, per op family and device type; the first available wins.
# The order follows the measured benchmark tables in README.md ("Backends"). CPU (2-core AMD EPYC,
# fp32, shared and noisy machine, ratios within one run): "cpu" beats "chunked" everywhere measured:
# info_nce QK B=256 K=2^20 D=128 fwd+bwd 0.37 s vs chunked 1.7 s vs eager 4.7 s (1.3 MiB extra
# memory vs eager's 4.1 GiB); MoCo K=65536 0.09 s vs 0.60 s vs 0.53 s; topk M=1024 N=2^20 D=128
# k=64 1.4 s vs chunked 51 s (FAISS flat index 5.3 s). CUDA (H100, bf16, benchmarks/results/
# gpu-backends-h100): triton < cuda < chunked on every op: topk M=8192 N=2^20 k=256 22 ms vs 156 vs
# 3419; info_nce B=1024 K=2^20 2.5 ms vs 24.8 vs 192; clip N=16384 D=256 7.0 ms vs 25.4 vs 120;
# MoCHi B=256 K=2^20 6.1 ms vs 46.5 (chunked not run).
AUTO_ORDER = {
    ("loss", "cuda"): ("triton", "cuda", "chunked"),
    ("loss", "cpu"): ("cpu", "chunked"),
    ("topk", "cuda"): ("triton", "cuda", "chunked"),
    ("topk", "cpu"): ("cpu", "chunked"),
    ("mix", "cuda"): ("triton", "cuda", "chunked"),
    ("mix", "cpu"): ("cpu", "chunked"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


_loaded = {}


def _module(name):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as exc:  # an optional dependency (triton, the compiled extension)
            _loaded[name] = exc
    return _loaded[name]


def backend_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else why not."""
    if name == "reference":
        return None
    mod = _module(name)
    if isinstance(mod, Exception):
        return f"its module could not be imported ({mod})"
    return mod.available(torch.device(device))


def resolve_backend(backend: str, family: str, device: torch.device):
    """The backend module (or the string "reference") that runs ``family`` on ``device``."""
    if backend == "reference":
        return "reference"
    if torch._C._are_functorch_transforms_active():
        # the fused kernels have no functorch rules (no batching rule for vmap, autograd.Functions
        # in the old style for grad): the reference's plain torch ops have them all
        if backend == "auto":
            return "reference"
        raise BackendUnavailableError(
            f"backend={backend!r} does not run under torch.func transforms (grad, vmap, jacrev, "
            "...); use backend='reference' (or 'auto', which takes it there)")
    if backend != "auto":
        reason = backend_unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} is not available on {device}: {reason}")
        return _module(backend)
    order = AUTO_ORDER.get((family, torch.device(device).type), ("chunked",))
    for name in order:
        if torch.compiler.is_compiling() and name not in _loaded:
            continue  # torch.compile cannot trace an import (a first JIT build): the next one
        if backend_unavailable_reason(name, device) is None:
            return _module(name)
    return _module("chunked")


def _is_reference(ops) -> bool:
    """resolve_backend's result is the string "reference" or a module (a module == str comparison
    breaks torch.compile(fullgraph=True) on torch 2.11)."""
    return isinstance(ops, str)


def _preload():
    """Import the backend modules that are cheap to import, now rather than at the first call:
    torch.compile cannot trace an import, so a first call under torch.compile(fullgraph=True)
    must find its backend already loaded. The C++/CUDA backends load their extension now when it
    is prebuilt or an earlier JIT build is cached; a first JIT build waits for the first use (or
    ``available_backends``), and until then ``auto`` under torch.compile passes over them."""
    _module("chunked")
    if importlib.util.find_spec("triton") is not None:
        _module("triton")
    try:
        prebuilt = importlib.util.find_spec("contrastive_kernels._C") is not None
    except (ImportError, ValueError):  # an import hook refusing it: treat as not built
        prebuilt = False
    from . import _ext

    if prebuilt or _ext.jit_build_cached():
        _ext.load()
        _module("cpu")
        _module("cuda")


def available_backends(device="cpu"):
    """{name: None or the reason it is unavailable} for every backend on ``device``."""
    return {name: backend_unavailable_reason(name, torch.device(device))
            for name in ("reference", *BACKEND_MODULES)}


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

_SHAPES = {2: "(rows, dim)", 3: "(batch, negatives, dim)"}


def _shape(x):
    return tuple(x.shape)


def _dense(name, x):
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a "
                        f"{'nested' if x.is_nested else x.layout} one; convert it (.to_dense())")


def _features(name, x, ndim=2, allow_empty=False):
    _dense(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {_SHAPES[ndim]}, got shape {_shape(x)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has feature dimension 0, shape {_shape(x)}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {_shape(x)}): the batch needs at least one row")


def _like(name, x, ref_name, ref, same_rows=False, allow_host=False):
    """x matches ref in dtype, device, feature dim (and row count)."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; cast them to "
                        "one dtype")
    host_bank = allow_host and x.device.type == "cpu" and ref.device.type == "cuda"
    if x.device != ref.device and not host_bank:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; move them to "
                         "one device")
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(f"{name} must have feature dimension {ref.shape[-1]} like {ref_name}, got "
                         f"shape {_shape(x)}")
    if same_rows and x.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} must have {ref.shape[0]} rows like {ref_name}, got shape "
                         f"{_shape(x)}")


def _choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def _positive_scalar(name, value, device, smallest=0.0):
    """A float > 0, or a 0-dim floating tensor (whose value is checked when it is on the CPU; on
    a GPU an invalid value yields NaN rather than a synchronizing check). ``smallest`` > 0: the
    value must be at least that (a temperature's reciprocal must be finite in float32)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got a bool")
    need = f"a finite number >= {smallest:.3g}" if smallest else "a finite number > 0"
    # comparisons, not math.isfinite: under torch.compile a float argument that changed between
    # calls is a SymFloat, which dynamo guards on but cannot pass to math functions
    above = (lambda v: v >= smallest) if smallest else (lambda v: v > 0)  # noqa: E731
    if isinstance(value, numbers.Real):
        if not (above(value) and value < math.inf):
            raise ValueError(f"{name} must be {need}, got {value}")
        # a Fraction or a numpy scalar becomes a float for the arithmetic (a SymFloat stays)
        return value if isinstance(value, (float, int, torch.SymFloat, torch.SymInt)) else float(value)
    if torch.is_tensor(value):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {_shape(value)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if (value.device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()):  # vmap over it: no .item()
            v = float(value.detach())
            if not (above(v) and v < math.inf):
                raise ValueError(f"{name} must be {need}, got {v}")
            return value
        wide = value if value.element_size() >= 4 else value.float()  # float32's tiny is 0 in fp16
        return torch.where(above(wide) & (wide < math.inf), value, torch.full_like(value, math.nan))
    raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")


# A temperature's smallest value: its reciprocal (the logits' scale) must be finite in float32
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def _number(name, value, low, high, high_open=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    # [low, high) as written: low = -inf admits -inf (mine_semantic_positives: every pair)
    ok = (math.isfinite(value) or value == low) and value >= low and (value < high if high_open else value <= high)
    if not ok:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return float(value)


def _count(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _index_tensor(name, x, ndim, rows=None):
    _dense(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(x)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {_shape(x)}")
    return x.long()


def _index_range(name, x, low, high):
    """Raise on the CPU; on a GPU return a 0-dim bool tensor 'some index is bad' (no sync)."""
    if x.numel() == 0:
        return None
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(x.min()), int(x.max())
        if lo < low or hi >= high:
            bad = lo if lo < low else hi
            raise ValueError(f"{name} must hold indices in [{low}, {high}), found {bad}")
        return None
    return ((x < low) | (x >= high)).any()


def _poison(loss, bad):
    """NaN loss where a GPU-side check found bad input (see module docstring)."""
    if bad is None:
        return loss
    return torch.where(bad, torch.full_like(loss, math.nan), loss)


def _common_options(similarity, reduction, backend):
    _choice("similarity", similarity, SIMILARITIES)
    _choice("reduction", reduction, REDUCTIONS)
    _choice("backend", backend, BACKENDS)


def _labels(name, labels, rows, device):
    _dense(name, labels)
    if labels.dim() == 1:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class ids when 1-D, got dtype {labels.dtype}")
    elif labels.dim() != 2:
        raise ValueError(f"{name} must be (batch,) integer labels or (batch, classes) multi-hot, "
                         f"got shape {_shape(labels)}")
    if labels.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows like the features, got shape {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    return labels


_routing = threading.local()


def _group(group, group_strategy="gather"):
    """None, or the checked process group; called once every local check has passed."""
    _choice("group_strategy", group_strategy, GROUP_STRATEGIES)
    if group is None:
        return None
    from . import distributed

    group = distributed.check_group(group)
    _routing.checked = True
    return group


def _agree_on_bad_input(fn):
    """With group=, a rank whose arguments fail the local checks tells the other ranks (which
    would otherwise wait forever in the first collective) before raising: every rank raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            return fn(*args, **kwargs)
        _routing.checked = False
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            if not getattr(_routing, "checked", True):
                from . import distributed

                distributed.raise_everywhere(group, fn.__name__, exc)
            raise

    return wrapper


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


@_agree_on_bad_input
def info_nce(query, positive_key, queue=None, *, temperature=0.07, similarity="dot",
             in_batch_negatives=None, tau_plus=0.0, beta=0.0, extra_negatives=None,
             mixing: Optional[Mixing] = None, reduction="mean", backend="auto", group=None,
             group_strategy="gather"):
    """InfoNCE with a queue / bank (MoCo, QK), in-batch negatives (SimCLR-style), or both.

    Row i's positive is positive_key[i]; negatives: the queue rows (shared, a gradient only if
    the queue requires one), the other rows of positive_key when ``in_batch_negatives`` (default:
    True iff ``queue`` is None), ``extra_negatives[i]`` (B, S, D) and MoCHi's synthetic points
    (``mixing``). ``tau_plus``/``beta`` switch to the DCL/HCL estimator. Returns the fp32 loss.

    ``group`` (a torch.distributed process group): query/positive_key rows are this rank's shard,
    the in-batch negatives are every rank's positive keys, the queue is replicated; the rank's
    local loss is returned (see ``contrastive_kernels.distributed``). ``group_strategy``:
    "gather" (all-gather the keys) or "ring" (pass them around, memory O(local batch)).
    """
    _features("query", query)
    _features("positive_key", positive_key)
    _like("positive_key", positive_key, "query", query, same_rows=True)
    if queue is not None:
        _features("queue", queue, allow_empty=True)
        _like("queue", queue, "query", query)
    if in_batch_negatives is not None and not isinstance(in_batch_negatives, bool):
        raise TypeError(f"in_batch_negatives must be None or a bool, got {type(in_batch_negatives).__name__}")
    if in_batch_negatives is None:
        in_batch_negatives = queue is None
    temperature = _positive_scalar("temperature", temperature, query.device, MIN_TEMPERATURE)
    _common_options(similarity, reduction, backend)
    tau_plus = _number("tau_plus", tau_plus, 0.0, 1.0)
    beta = _number("beta", beta, 0.0, math.inf)
    if extra_negatives is not None:
        _features("extra_negatives", extra_negatives, ndim=3)
        _like("extra_negatives", extra_negatives, "query", query, same_rows=True)
    if mixing is not None:
        if not isinstance(mixing, Mixing):
            raise TypeError(f"mixing must be a contrastive_kernels.Mixing, got {type(mixing).__name__}")
        if queue is None or queue.shape[0] < mixing.n_hard:
            have = 0 if queue is None else queue.shape[0]
            raise ValueError(f"mixing needs a queue with at least n_hard={mixing.n_hard} rows, got {have}")
    if _group(group, group_strategy) is not None:
        from . import distributed

        return distributed.info_nce(query, positive_key, queue, temperature=temperature,
                                    similarity=similarity, in_batch_negatives=in_batch_negatives,
                                    tau_plus=tau_plus, beta=beta, extra_negatives=extra_negatives,
                                    mixing=mixing, reduction=reduction, backend=backend, group=group,
                                    group_strategy=group_strategy)
    ops = resolve_backend(backend, "loss", query.device)
    kwargs = dict(temperature=temperature, similarity=similarity,
                  in_batch_negatives=in_batch_negatives, tau_plus=tau_plus, beta=beta,
                  extra_negatives=extra_negatives, mixing=mixing, reduction=reduction)
    if _is_reference(ops):
        return reference.info_nce(query, positive_key, queue, **kwargs)
    return losses.info_nce(ops, query, positive_key, queue, **kwargs)


@_agree_on_bad_input
def nt_xent(z1, z2, *, temperature=0.5, similarity="cosine", tau_plus=0.0, beta=0.0,
            mixing: Optional[Mixing] = None, reduction="mean", backend="auto", group=None,
            group_strategy="gather"):
    """SimCLR's NT-Xent over the 2B views cat([z1, z2]): each view's positive is its other view,
    its negatives the other 2B-2 views. "none" returns the (2B,) per-view losses.

    With ``group``, the views of every rank are the columns (each view's negatives are the other
    2N-2 views of the whole batch) and the rank's local loss over its own 2B views is returned."""
    _features("z1", z1)
    _features("z2", z2)
    _like("z2", z2, "z1", z1, same_rows=True)
    temperature = _positive_scalar("temperature", temperature, z1.device, MIN_TEMPERATURE)
    _common_options(similarity, reduction, backend)
    tau_plus = _number("tau_plus", tau_plus, 0.0, 1.0)
    beta = _number("beta", beta, 0.0, math.inf)
    if mixing is not None:
        if not isinstance(mixing, Mixing):
            raise TypeError(f"mixing must be a contrastive_kernels.Mixing, got {type(mixing).__name__}")
        available = 2 * z1.shape[0] - 2
        if mixing.n_hard > available:
            raise ValueError(f"mixing.n_hard={mixing.n_hard} exceeds the {available} in-batch "
                             "negatives of each view (2B-2)")
    kwargs = dict(temperature=temperature, similarity=similarity, tau_plus=tau_plus, beta=beta,
                  mixing=mixing, reduction=reduction)
    if _group(group, group_strategy) is not None:
        from . import distributed

        return distributed.nt_xent(z1, z2, **kwargs, backend=backend, group=group,
                                   group_strategy=group_strategy)
    ops = resolve_backend(backend, "loss", z1.device)
    if _is_reference(ops):
        return reference.nt_xent(z1, z2, **kwargs)
    return losses.nt_xent(ops, z1, z2, **kwargs)


@_agree_on_bad_input
def clip_loss(image_features, text_features, logit_scale, *, similarity="dot", reduction="mean",
              backend="auto", group=None, group_strategy="gather"):
    """CLIP's symmetric loss 0.5 * (CE(scale I T^T, arange) + CE(scale T I^T, arange)), with
    gradients to both feature sets and to ``logit_scale`` (the scale itself, e.g.
    ``log_scale.exp()``; a float or 0-dim tensor).

    With ``group``, each local image is contrasted with the texts of every rank and each local
    text with the images of every rank; the rank's local loss over its own pairs is returned."""
    _features("image_features", image_features)
    _features("text_features", text_features)
    _like("text_features", text_features, "image_features", image_features, same_rows=True)
    logit_scale = _positive_scalar("logit_scale", logit_scale, image_features.device)
    _common_options(similarity, reduction, backend)
    kwargs = dict(similarity=similarity, reduction=reduction)
    if _group(group, group_strategy) is not None:
        from . import distributed

        return distributed.clip_loss(image_features, text_features, logit_scale, **kwargs,
                                     backend=backend, group=group, group_strategy=group_strategy)
    ops = resolve_backend(backend, "loss", image_features.device)
    if _is_reference(ops):
        return reference.clip_loss(image_features, text_features, logit_scale, **kwargs)
    return losses.clip_loss(ops, image_features, text_features, logit_scale, **kwargs)


@_agree_on_bad_input
def sup_con(features, labels, *, temperature=0.07, similarity="cosine", reduction="mean",
            backend="auto", group=None, group_strategy="gather"):
    """Supervised contrastive loss (SupCon L_out). ``labels``: (B,) integer class ids, or (B, C)
    multi-hot (rows are positives when they share any label). Anchors without a positive are left
    out of the mean (and are 0 under "none").

    With ``group``, the anchors are this rank's rows and the candidates the rows (and labels) of
    every rank; "mean" divides by the number of anchors with a positive averaged over the ranks,
    so that the mean of the ranks' losses is the whole-batch loss."""
    _features("features", features)
    labels = _labels("labels", labels, features.shape[0], features.device)
    temperature = _positive_scalar("temperature", temperature, features.device, MIN_TEMPERATURE)
    _common_options(similarity, reduction, backend)
    kwargs = dict(temperature=temperature, similarity=similarity, reduction=reduction)
    if _group(group, group_strategy) is not None:
        from . import distributed

        return distributed.sup_con(features, labels, **kwargs, backend=backend, group=group,
                                   group_strategy=group_strategy)
    ops = resolve_backend(backend, "loss", features.device)
    if _is_reference(ops):
        return reference.sup_con(features, labels, **kwargs)
    return losses.sup_con(ops, features, labels, **kwargs)


@_agree_on_bad_input
def multi_positive_info_nce(query, keys, positive_index, queue=None, *, temperature=0.07,
                            similarity="dot", reduction="mean", backend="auto", group=None,
                            group_strategy="gather"):
    """Multi-positive InfoNCE: row i's loss is the mean over its positives p
    (``positive_index[i]``, -1 = padding; indices count the keys first, then the queue rows) of
    -log softmax over all keys + queue at p. Rows without a positive are left out of the mean.

    With ``group``, query rows and keys are both sharded and ``positive_index`` holds global
    indices: [0, W * K_local) are the keys of every rank in rank order (rank s's key j is
    s * K_local + j), then the rows of the (replicated) queue."""
    _features("query", query)
    _features("keys", keys)
    _like("keys", keys, "query", query)
    if queue is not None:
        _features("queue", queue, allow_empty=True)
        _like("queue", queue, "query", query)
    positive_index = _index_tensor("positive_index", positive_index, 2, rows=query.shape[0])
    if positive_index.device != query.device:
        raise ValueError(f"positive_index is on {positive_index.device} but query is on {query.device}")
    n_key_columns = keys.shape[0]
    if group is not None:  # global indices: the keys of every rank come first
        from . import distributed

        n_key_columns *= distributed.world_size(distributed.check_group(group))
    n_columns = n_key_columns + (0 if queue is None else queue.shape[0])
    bad = _index_range("positive_index", positive_index, -1, n_columns)
    temperature = _positive_scalar("temperature", temperature, query.device, MIN_TEMPERATURE)
    _common_options(similarity, reduction, backend)
    if bad is not None:
        positive_index = torch.where((positive_index >= -1) & (positive_index < n_columns),
                                     positive_index, torch.full_like(positive_index, -1))
    kwargs = dict(temperature=temperature, similarity=similarity, reduction=reduction)
    if _group(group, group_strategy) is not None:
        from . import distributed

        loss = distributed.multi_positive_info_nce(query, keys, positive_index, queue, **kwargs,
                                                   backend=backend, group=group,
                                                   group_strategy=group_strategy)
        return _poison(loss, bad)
    ops = resolve_backend(backend, "loss", query.device)
    if _is_reference(ops):
        loss = reference.multi_positive_info_nce(query, keys, positive_index, queue, **kwargs)
    else:
        loss = losses.multi_positive_info_nce(ops, query, keys, positive_index, queue, **kwargs)
    return _poison(loss, bad)


# --------------------------------------------------------------------------------------------
# mining and mixing
# --------------------------------------------------------------------------------------------


def _available_counts(n, exclude_index, query_labels, bank_labels, exclude_same_label):
    """Bank rows each query may return (for the 'k > available rows' error)."""
    avail = torch.full((exclude_index.shape[0] if exclude_index is not None else
                        query_labels.shape[0],), n, dtype=torch.long)
    if exclude_same_label:
        bank_l = bank_labels.cpu()
        values, counts = torch.unique(bank_l, return_counts=True)
        ql = query_labels.cpu()
        pos = torch.searchsorted(values, ql).clamp(max=max(0, values.numel() - 1))
        same = torch.where(values[pos] == ql, counts[pos], torch.zeros_like(ql))
        avail = avail - same
    if exclude_index is not None:
        ex = exclude_index.cpu()
        hit = ex >= 0
        if exclude_same_label:
            hit &= bank_labels.cpu()[ex.clamp(min=0)] != query_labels.cpu()
        avail = avail - hit.long()
    return avail


def topk_similarity(query, bank, k, *, similarity="dot", exclude_index=None, query_labels=None,
                    bank_labels=None, exclude_same_label=False, backend="auto", progress=None):
    """Exact top-k bank rows per query by similarity (largest first; ties: lower index first)
    without forming the (M, N) score matrix. Returns (values in the query's dtype, int64 indices),
    each (M, k), as a named tuple (``.values``, ``.indices``). The values carry no gradient on any
    backend (mining picks rows: score the picked rows again where a gradient is wanted). ``bank``
    may stay on the host while ``query`` is on a GPU (streamed in chunks). ``progress``: a progress
    bar on stderr while the query rows are searched in blocks (None: when the search should take
    more than about PROGRESS_AFTER_S seconds; the result is the same either way, up to the
    rounding of a matmul over fewer rows)."""
    _features("query", query)
    _features("bank", bank)
    _like("bank", bank, "query", query, allow_host=True)
    _choice("similarity", similarity, SIMILARITIES)
    _choice("backend", backend, BACKENDS)
    m, n = query.shape[0], bank.shape[0]
    k = _count("k", k, low=1)
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} rows of bank")
    if exclude_index is not None:
        exclude_index = _index_tensor("exclude_index", exclude_index, 1, rows=m).to(query.device)
        _index_range("exclude_index", exclude_index.cpu(), -1, n)
    if not isinstance(exclude_same_label, bool):
        raise TypeError(f"exclude_same_label must be a bool, got {type(exclude_same_label).__name__}")
    if exclude_same_label:
        if query_labels is None or bank_labels is None:
            raise ValueError("exclude_same_label=True needs both query_labels and bank_labels")
        query_labels = _index_tensor("query_labels", query_labels, 1, rows=m).to(query.device)
        bank_labels = _index_tensor("bank_labels", bank_labels, 1, rows=n)
    else:
        query_labels = bank_labels = None
    if exclude_index is not None or exclude_same_label:
        avail = _available_counts(n, exclude_index, query_labels, bank_labels, exclude_same_label)
        worst = int(avail.argmin())
        if int(avail[worst]) < k:
            raise ValueError(f"k={k} exceeds the bank rows left after exclusions: query row {worst} "
                             f"has only {int(avail[worst])}")
    _progress_flag(progress)
    ops = resolve_backend(backend, "topk", query.device)
    return _topk_in_blocks(ops, query, bank, k, similarity, exclude_index, query_labels, bank_labels,
                           progress, "topk_similarity")


# Progress of a search: a rough score rate (FLOP/s) per device type and host-to-device bandwidth
# (bytes/s), only to decide when a search is long enough for a progress bar (about
# PROGRESS_AFTER_S) and how many query rows a block takes
_SCORE_RATE = {"cpu": 2e11, "cuda": 2e14}
_HOST_BANK_BANDWIDTH = 2.5e10
PROGRESS_AFTER_S = 10.0


def _progress_flag(progress):
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")


def _search_plan(m, n, d, device_type, host_bank_bytes, progress):
    """(query rows per block, whether a bar is shown) for a search of m query rows over n bank
    rows of width d; ``host_bank_bytes``: the size of a bank streamed from the host (0: none)."""
    row_s = 2.0 * n * d / _SCORE_RATE.get(device_type, 2e11)   # scoring one query row
    bank_pass_s = host_bank_bytes / _HOST_BANK_BANDWIDTH        # streaming the bank once
    if progress is None:
        progress = m * row_s + bank_pass_s > PROGRESS_AFTER_S
    if not progress:
        return m, False
    # about 100 updates, each block at least 0.2 s of scoring (so the blocks cost nothing
    # measurable) and, as each block streams a host bank once more, at least one pass of it
    # (so its copies stay hidden behind the block's kernels)
    rows = max(-(-m // 100), math.ceil(max(0.2, bank_pass_s) / row_s), 1)
    return min(rows, m), True


def _topk_in_blocks(ops, query, bank, k, similarity, exclude_index, query_labels, bank_labels,
                    progress, desc):
    """The search of topk_similarity on validated arguments, in query blocks under a bar when
    ``progress`` (or the estimate) asks for one."""
    if progress is not False and torch.compiler.is_compiling():
        progress = False  # no bar inside a compiled graph (tqdm cannot be traced)
    m, n, d = query.shape[0], bank.shape[0], query.shape[1]
    host_bytes = bank.numel() * bank.element_size() if bank.device != query.device else 0
    block, show = _search_plan(m, n, d, query.device.type, host_bytes, progress)
    if not show:
        return _topk_once(ops, query, bank, k, similarity, exclude_index, query_labels, bank_labels)
    from tqdm import tqdm

    parts = []
    with tqdm(total=m, desc=desc, unit="row", dynamic_ncols=True) as bar:
        for i0 in range(0, m, block):
            i1 = min(m, i0 + block)
            parts.append(_topk_once(ops, query[i0:i1], bank, k, similarity,
                                    None if exclude_index is None else exclude_index[i0:i1],
                                    None if query_labels is None else query_labels[i0:i1],
                                    bank_labels))
            if query.device.type == "cuda":
                torch.cuda.synchronize(query.device)  # the bar follows the kernels, not the launches
            bar.update(i1 - i0)
    if len(parts) == 1:
        return parts[0]
    return TopK(torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]))


def _topk_once(ops, query, bank, k, similarity, exclude_index, query_labels, bank_labels):
    if _is_reference(ops):
        return reference.topk_similarity(query, bank, k, similarity=similarity,
                                         exclude_index=exclude_index, query_labels=query_labels,
                                         bank_labels=bank_labels,
                                         exclude_same_label=query_labels is not None)
    values, indices = ops.topk(query, bank, k, similarity=similarity, exclude_index=exclude_index,
                               query_labels=query_labels, bank_labels=bank_labels)
    return TopK(values.to(query.dtype), indices)


def mine_semantic_positives(embeddings, k, threshold, *, similarity="cosine", backend="auto",
                            progress=None):
    """Semantic positive pairs: directed (i, j), i != j, j among the k most similar rows of i with
    score >= threshold (-inf: all of them). Returns pairs (P, 2) int64 sorted by i then descending
    score, scores (P,). ``progress``: as topk_similarity's (the rows are mined in blocks)."""
    _features("embeddings", embeddings)
    n = embeddings.shape[0]
    k = _count("k", k, low=1)
    if k > n - 1:
        raise ValueError(f"k={k} exceeds the {n - 1} other rows of embeddings")
    threshold = _number("threshold", threshold, -math.inf, math.inf)
    _choice("similarity", similarity, SIMILARITIES)
    _choice("backend", backend, BACKENDS)
    _progress_flag(progress)
    rows = torch.arange(n, device=embeddings.device)
    ops = resolve_backend(backend, "topk", embeddings.device)
    values, indices = _topk_in_blocks(ops, embeddings, embeddings, k, similarity, rows, None, None,
                                      progress, "mine_semantic_positives")
    keep = values.float() >= threshold
    pairs = torch.stack([rows[:, None].expand(n, k)[keep], indices[keep]], 1)
    return pairs, values[keep]


def mix_hard_negatives(query, negatives, hard_index, n_synthetic, n_query_synthetic, *,
                       generator=None, backend="auto"):
    """MoCHi's synthetic hard negatives (B, s+s', D), unit norm, without gradient: per row,
    ``n_synthetic`` points normalize(a n_x + (1-a) n_y) (x, y from the row's ``hard_index``,
    a ~ U(0,1)), then ``n_query_synthetic`` points normalize(b q + (1-b) n_y), b ~ U(0, 0.5)."""
    _features("query", query)
    _features("negatives", negatives)
    _like("negatives", negatives, "query", query)
    hard_index = _index_tensor("hard_index", hard_index, 2, rows=query.shape[0])
    if hard_index.shape[1] == 0:
        raise ValueError("hard_index must have at least one column (n_hard >= 1)")
    if hard_index.device != query.device:
        raise ValueError(f"hard_index is on {hard_index.device} but query is on {query.device}")
    _index_range("hard_index", hard_index.cpu() if query.device.type == "cpu" else hard_index, 0,
                 negatives.shape[0])
    n_synthetic = _count("n_synthetic", n_synthetic)
    n_query_synthetic = _count("n_query_synthetic", n_query_synthetic)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _choice("backend", backend, BACKENDS)
    ops = resolve_backend(backend, "mix", query.device)
    if _is_reference(ops):
        return reference.mix_hard_negatives(query, negatives, hard_index, n_synthetic,
                                            n_query_synthetic, generator=generator)
    draws = draw_mixing(query.shape[0], hard_index.shape[1], n_synthetic, n_query_synthetic,
                        generator, query.device)
    return ops.mix(query, negatives, hard_index, draws)


_preload()
