"""Modules over the functional API: losses that hold their options, CLIP's learnable logit scale,
and MoCo's queue."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from ._common import NORM_EPS, Mixing


class _Shared:
    """A reference that copy / deepcopy share instead of copying (a process group cannot be
    copied: a deep copy of a loss module or queue, e.g. MoCo's key encoder, keeps the group)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class _GroupAttribute:
    """The ``group`` attribute of the modules, stored as a ``_Shared`` reference."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        ref = obj.__dict__.get("_group_ref")
        return None if ref is None else ref.value

    def __set__(self, obj, value):
        obj.__dict__["_group_ref"] = _Shared(value)


def _positive_start(name, value) -> float:
    """A float > 0 to start a learnable value from: a real number (numpy's too) or a one-element
    floating tensor, finite and > 0 (a non-finite start would leave the parameter stuck)."""
    if torch.is_tensor(value) and value.numel() == 1 and value.is_floating_point():
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float > 0, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


class _TemperatureLoss(nn.Module):
    """A loss module's temperature: the float or tensor given (an nn.Parameter given is
    registered), or with ``learnable_temperature=True`` the exp of a learnable
    ``log_temperature`` initialized at log(temperature), so that it stays positive.

    ``loss.temperature = t`` changes it (e.g. a temperature schedule); with a learnable
    temperature it sets ``log_temperature`` to log(t) in place (the optimizer keeps its
    parameter)."""

    def _init_temperature(self, temperature, learnable: bool):
        if learnable:
            if isinstance(temperature, nn.Parameter):
                raise ValueError("learnable_temperature=True creates its own parameter; give a "
                                 "float to start from (or give the nn.Parameter with "
                                 "learnable_temperature=False)")
            start = _positive_start("a learnable temperature's start", temperature)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(start)))
            self._fixed_temperature = None
        else:
            self._fixed_temperature = temperature

    @property
    def temperature(self):
        if self._fixed_temperature is None:
            return self.log_temperature.exp()
        return self._fixed_temperature

    @temperature.setter
    def temperature(self, value):
        if self._fixed_temperature is None:  # learnable: keep the parameter, move its value
            start = _positive_start("temperature", value)
            with torch.no_grad():
                self.log_temperature.fill_(math.log(start))
            return
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
            raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(value).__name__}")
        if "_fixed_temperature" in self._parameters and not isinstance(value, nn.Parameter):
            del self._parameters["_fixed_temperature"]  # a float or tensor replaces a given parameter
        self._fixed_temperature = value

    def __setattr__(self, name, value):
        if name == "temperature":  # nn.Module would register an nn.Parameter given under that name
            _TemperatureLoss.temperature.fset(self, value)
        else:
            super().__setattr__(name, value)


class InfoNCELoss(_TemperatureLoss):
    """``info_nce`` as a module: ``loss = InfoNCELoss(temperature=0.2)(query, positive_key, queue)``.

    ``learnable_temperature=True`` learns the temperature (as ``log_temperature``, so it stays
    positive). ``group`` /
    ``group_strategy`` ("gather" or "ring"): the distributed convention of
    ``contrastive_kernels.distributed`` (put the module inside the DDP model so that a learnable
    temperature is averaged like the other parameters)."""

    group = _GroupAttribute()

    def __init__(self, temperature=0.07, *, similarity="dot", in_batch_negatives=None,
                 tau_plus=0.0, beta=0.0, mixing: Optional[Mixing] = None, reduction="mean",
                 backend="auto", group=None, learnable_temperature=False, group_strategy="gather"):
        super().__init__()
        self._init_temperature(temperature, learnable_temperature)
        self.similarity, self.in_batch_negatives = similarity, in_batch_negatives
        self.tau_plus, self.beta, self.mixing = tau_plus, beta, mixing
        self.reduction, self.backend, self.group = reduction, backend, group
        self.group_strategy = group_strategy

    def forward(self, query, positive_key, queue=None, extra_negatives=None):
        return functional.info_nce(
            query, positive_key, queue, temperature=self.temperature, similarity=self.similarity,
            in_batch_negatives=self.in_batch_negatives, tau_plus=self.tau_plus, beta=self.beta,
            extra_negatives=extra_negatives, mixing=self.mixing, reduction=self.reduction,
            backend=self.backend, group=self.group, group_strategy=self.group_strategy)


class NTXentLoss(_TemperatureLoss):
    """``nt_xent`` (SimCLR) as a module: ``NTXentLoss(temperature=0.5)(z1, z2)``."""

    group = _GroupAttribute()

    def __init__(self, temperature=0.5, *, similarity="cosine", tau_plus=0.0, beta=0.0,
                 mixing: Optional[Mixing] = None, reduction="mean", backend="auto", group=None,
                 learnable_temperature=False, group_strategy="gather"):
        super().__init__()
        self._init_temperature(temperature, learnable_temperature)
        self.similarity, self.tau_plus, self.beta, self.mixing = similarity, tau_plus, beta, mixing
        self.reduction, self.backend, self.group = reduction, backend, group
        self.group_strategy = group_strategy

    def forward(self, z1, z2):
        return functional.nt_xent(z1, z2, temperature=self.temperature, similarity=self.similarity,
                                  tau_plus=self.tau_plus, beta=self.beta, mixing=self.mixing,
                                  reduction=self.reduction, backend=self.backend, group=self.group,
                                  group_strategy=self.group_strategy)


class SupConLoss(_TemperatureLoss):
    """``sup_con`` as a module: ``SupConLoss(temperature=0.1)(features, labels)``."""

    group = _GroupAttribute()

    def __init__(self, temperature=0.07, *, similarity="cosine", reduction="mean", backend="auto",
                 group=None, learnable_temperature=False, group_strategy="gather"):
        super().__init__()
        self._init_temperature(temperature, learnable_temperature)
        self.similarity, self.reduction, self.backend, self.group = similarity, reduction, backend, group
        self.group_strategy = group_strategy

    def forward(self, features, labels):
        return functional.sup_con(features, labels, temperature=self.temperature,
                                  similarity=self.similarity, reduction=self.reduction,
                                  backend=self.backend, group=self.group,
                                  group_strategy=self.group_strategy)


class ClipLoss(nn.Module):
    """CLIP's symmetric loss with a learnable logit scale, kept as its log
    (``log_logit_scale``, initialized to log(1/0.07)); the scale used is
    ``exp(log_logit_scale)`` clamped at ``max_logit_scale`` (100, as CLIP does).

    As in CLIP, the clamp is on the parameter: each use of ``logit_scale`` (each forward) first
    clamps ``log_logit_scale`` in place at log(max_logit_scale), so the scale gets a gradient at
    the cap in both directions and can come back down when the loss asks for it (an optimizer
    step past the cap is undone by the next use instead of leaving a parameter with zero
    gradient for good). ``learnable=False`` keeps the log scale as a buffer."""

    group = _GroupAttribute()

    def __init__(self, init_logit_scale=1 / 0.07, *, max_logit_scale=100.0, learnable=True,
                 similarity="dot", reduction="mean", backend="auto", group=None,
                 group_strategy="gather"):
        super().__init__()
        init_logit_scale = _positive_start("init_logit_scale", init_logit_scale)
        if isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, numbers.Real):
            raise TypeError(f"max_logit_scale must be a float > 0, got {type(max_logit_scale).__name__}")
        if not max_logit_scale > 0:  # NaN fails too; inf: no cap
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale!r}")
        log_scale = torch.tensor(math.log(init_logit_scale))
        if learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.max_logit_scale = float(max_logit_scale)
        self.similarity, self.reduction, self.backend, self.group = similarity, reduction, backend, group
        self.group_strategy = group_strategy

    @property
    def logit_scale(self) -> torch.Tensor:
        log_scale, cap = self.log_logit_scale, self.max_logit_scale
        if not isinstance(log_scale, nn.Parameter) or math.isinf(cap):
            return log_scale.exp().clamp(max=cap)
        # CLIP's clamp of the parameter itself (the same on every DDP rank), on .data: no version
        # bump, so a graph that saved the parameter before this use stays valid
        log_scale.data.clamp_(max=math.log(cap))
        # exp's gradient (exp saves its output, not the parameter: several forwards before one
        # backward are fine), and the value min(exp, cap) exactly: exp(log(cap)) may round above
        scale = log_scale.exp()
        return scale - (scale - cap).clamp(min=0).detach()

    def forward(self, image_features, text_features):
        return functional.clip_loss(image_features, text_features, self.logit_scale,
                                    similarity=self.similarity, reduction=self.reduction,
                                    backend=self.backend, group=self.group,
                                    group_strategy=self.group_strategy)


class MoCoQueue(nn.Module):
    """MoCo's queue of negative keys: a ring buffer of ``size`` rows of ``dim`` features.

    ``queue.keys`` (or ``queue()``) is the (size, dim) tensor to pass as ``info_nce(queue=...)``;
    ``queue.enqueue(keys)`` writes the newest keys over the oldest, wrapping around. Both are
    buffers: ``state_dict`` / ``load_state_dict`` round-trip them and ``.to()`` moves them.
    Initialized, as MoCo does, with random unit vectors. Call ``enqueue`` after ``backward``
    (the loss may have saved the queue for its backward pass). With ``group`` set, ``enqueue``
    gathers the keys of every rank first so that all ranks keep identical queues.
    """

    group = _GroupAttribute()

    def __init__(self, size: int, dim: int, *, dtype=torch.float32, device=None, group=None,
                 normalize: bool = True):
        super().__init__()
        # numbers.Integral: numpy integers too, as the functional API takes them
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        size, dim = int(size), int(dim)
        init = torch.randn(size, dim, device=device)
        if normalize:
            init = F.normalize(init, dim=1, eps=NORM_EPS)
        self.register_buffer("keys", init.to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self.group = group
        self.normalize = normalize

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def forward(self) -> torch.Tensor:
        return self.keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        try:
            if not torch.is_tensor(keys) or keys.dim() != 2 or keys.shape[1] != self.keys.shape[1]:
                shape = tuple(keys.shape) if torch.is_tensor(keys) else type(keys).__name__
                raise ValueError(f"keys must be (n, {self.keys.shape[1]}), got {shape}")
            if not keys.is_floating_point():
                raise TypeError(f"keys must be floating point, got dtype {keys.dtype}")
            functional._dense("keys", keys)
        except (TypeError, ValueError) as exc:
            if self.group is not None:  # the other ranks raise too instead of waiting forever
                from . import distributed

                distributed.raise_everywhere(self.group, "MoCoQueue.enqueue", exc)
            raise
        if self.group is not None:
            from . import distributed

            # every rank's keys, in rank order: all ranks keep identical queues
            keys = distributed.all_gather_rows(keys.detach(), self.group)
        keys = keys.detach().to(device=self.keys.device, dtype=self.keys.dtype)
        if keys.untyped_storage().data_ptr() == self.keys.untyped_storage().data_ptr():
            keys = keys.clone()  # rows of the queue itself: the writes below would overlap them
        n = keys.shape[0]
        if n == 0:
            return
        if n >= self.size:  # only the newest `size` keys survive
            keys, n = keys[-self.size:], self.size
        start = int(self.ptr)
        first = min(n, self.size - start)
        self.keys[start:start + first] = keys[:first]
        if first < n:
            self.keys[:n - first] = keys[first:]
        self.ptr.fill_((start + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.keys.shape[1]}, dtype={self.keys.dtype}"
