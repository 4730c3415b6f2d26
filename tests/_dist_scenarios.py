"""Scenarios run inside every rank by tests/_dist_worker.py (mode "scenarios"): bad calls that
must raise on every rank instead of hanging, MoCoQueue under DDP, and DDP training steps that must
follow the whole-batch loss. Each returns something picklable; an exception is recorded as
{"error": type name, "message": str} (the test then checks that every rank raised)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import contrastive_kernels as ck


def _x(rows, d=6, dtype=torch.float64, seed=0):
    return torch.randn(rows, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# --- calls that must raise on every rank -------------------------------------------------------


def mismatch_dim(rank, world, group):
    d = 8 if rank == 0 else 7
    return ck.info_nce(_x(3, d), _x(3, d), group=group, group_strategy="ring")


def mismatch_dtype(rank, world, group):
    dt = torch.float32 if rank == 0 else torch.float64
    return ck.clip_loss(_x(3, dtype=dt), _x(3, dtype=dt), 10.0, group=group)


def uneven_rows(rank, world, group):
    rows = 4 if rank == 0 else 3
    return ck.sup_con(_x(rows), torch.arange(rows) % 2, group=group, group_strategy="ring")


def uneven_keys(rank, world, group):
    keys = 5 if rank == world - 1 else 4
    index = torch.zeros(3, 2, dtype=torch.long)
    return ck.multi_positive_info_nce(_x(3), _x(keys), index, group=group)


def local_failure(rank, world, group):
    temperature = -1.0 if rank == 1 else 0.1  # rank 1 fails its own argument checks
    return ck.nt_xent(_x(3), _x(3), temperature=temperature, group=group)


def local_failure_shape(rank, world, group):
    rows = 2 if rank == 0 else 3  # rank 0: positive_key and query disagree locally
    return ck.info_nce(_x(3), _x(rows), group=group, group_strategy="ring")


def different_options(rank, world, group):
    similarity = "cosine" if rank == 0 else "dot"
    return ck.info_nce(_x(3), _x(3), similarity=similarity, group=group)


def different_strategies(rank, world, group):
    return ck.info_nce(_x(3), _x(3), group=group, group_strategy="ring" if rank == 0 else "gather")


def different_functions(rank, world, group):
    if rank == 0:
        return ck.nt_xent(_x(3), _x(3), group=group)
    return ck.info_nce(_x(3), _x(3), group=group)


def requires_grad_mismatch(rank, world, group):
    q = _x(3).requires_grad_(rank == 0)  # a backward only some ranks would join
    return ck.info_nce(q, _x(3).requires_grad_(True), group=group, group_strategy="ring")


def label_width_mismatch(rank, world, group):
    labels = (torch.rand(3, 4 + rank) < 0.5).long()
    return ck.sup_con(_x(3), labels, group=group)


def bad_group_type(rank, world, group):
    return ck.info_nce(_x(3), _x(3), group="world")


def nt_xent_mixing(rank, world, group):
    return ck.nt_xent(_x(3), _x(3), mixing=ck.Mixing(2, 2), group=group)


def moco_bad_keys(rank, world, group):
    queue = ck.nn.MoCoQueue(8, 6, group=group)
    queue.enqueue(_x(2, d=5 if rank == 0 else 6))


def moco_dtype_mismatch(rank, world, group):
    queue = ck.nn.MoCoQueue(8, 6, group=group)
    queue.enqueue(_x(2, dtype=torch.float32 if rank == 0 else torch.float64))


# --- things that must work --------------------------------------------------------------------


def after_errors_still_in_sync(rank, world, group):
    """Run last: after all the errors above the ranks still agree on the collective sequence."""
    out = ck.info_nce(_x(3, seed=rank), _x(3, seed=10 + rank), group=group, group_strategy="ring")
    total = out.detach().clone()
    dist.all_reduce(total, group=group)
    return float(total)


def deepcopy_keeps_the_group(rank, world, group):
    """A deep copy of a loss module or queue (MoCo copies its encoder) shares the process group,
    which cannot be copied, and still works."""
    loss = copy.deepcopy(ck.nn.InfoNCELoss(0.2, group=group, group_strategy="ring"))
    queue = copy.deepcopy(ck.nn.MoCoQueue(4, 6, group=group))
    queue.enqueue(_x(1, seed=rank))
    return [loss.group is group, queue.group is group, float(loss(_x(3), _x(3, seed=2)))]


def moco_queue(rank, world, group):
    """Uneven enqueue sizes (rank r enqueues r + 1 rows), wrapping around: every rank's queue is
    the same, the keys of all ranks in rank order."""
    torch.manual_seed(123)  # the same initial queue everywhere (MoCo initializes identically)
    queue = ck.nn.MoCoQueue(7, 3, group=group)
    steps = []
    for step in range(3):
        keys = torch.full((rank + 1, 3), float(100 * step + rank))
        queue.enqueue(keys)
        steps.append((queue.keys.clone(), int(queue.ptr), int(queue.filled)))
    return steps


class _Encoder(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.net = torch.nn.Linear(6, 4).double()
        self.loss = loss

    def forward(self, a, b):
        z = self.net(torch.cat([a, b]))  # one forward per DDP step
        return self.loss(z[:a.shape[0]], z[a.shape[0]:])


def _ddp_step(rank, world, group, make_loss, steps=2):
    """DDP with group= losses vs one process on the whole batch: after ``steps`` SGD steps the
    parameters (incl. a learnable temperature / logit scale) agree. Returns the largest
    difference."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(5)
    whole = _Encoder(make_loss(None))
    local = copy.deepcopy(whole)
    local.loss.group = group
    ddp = DDP(local, process_group=group)
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.5)
    opt_local = torch.optim.SGD(ddp.parameters(), lr=0.5)
    b = 3
    g = torch.Generator().manual_seed(9)
    for _ in range(steps):
        a = torch.randn(world * b, 6, dtype=torch.float64, generator=g)
        c = torch.randn(world * b, 6, dtype=torch.float64, generator=g)
        mine = slice(rank * b, (rank + 1) * b)
        opt_whole.zero_grad()
        whole(a, c).backward()
        opt_whole.step()
        opt_local.zero_grad()
        ddp(a[mine], c[mine]).backward()
        opt_local.step()
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(whole.parameters(), local.parameters()))


def ddp_info_nce_gather(rank, world, group):
    return _ddp_step(rank, world, group, lambda grp: ck.nn.InfoNCELoss(
        0.3, similarity="cosine", learnable_temperature=True, group=grp))


def ddp_info_nce_ring(rank, world, group):
    return _ddp_step(rank, world, group, lambda grp: ck.nn.InfoNCELoss(
        0.3, similarity="l2", tau_plus=0.1, learnable_temperature=True, group=grp,
        group_strategy="ring"))


def ddp_clip_ring(rank, world, group):
    return _ddp_step(rank, world, group, lambda grp: ck.nn.ClipLoss(
        5.0, similarity="cosine", group=grp, group_strategy="ring"))


def ddp_clip_gather(rank, world, group):
    return _ddp_step(rank, world, group, lambda grp: ck.nn.ClipLoss(5.0, group=grp))


def ddp_nt_xent_ring(rank, world, group):
    return _ddp_step(rank, world, group, lambda grp: ck.nn.NTXentLoss(
        0.4, learnable_temperature=True, group=grp, group_strategy="ring"))


def traffic(rank, world, group):
    """Bytes this rank sends in one forward+backward step, for comparison with the formulas of
    contrastive_kernels.bench.distributed.comm_bytes."""
    from contrastive_kernels import distributed as ckd

    out = {}
    for loss, similarity, strategy, dtype in [
            ("info_nce", "cosine", "gather", torch.float32), ("info_nce", "dot", "ring", torch.float32),
            ("info_nce", "l2", "ring", torch.bfloat16), ("info_nce", "cosine", "ring", torch.float64),
            ("clip_loss", "cosine", "gather", torch.float32), ("clip_loss", "dot", "ring", torch.bfloat16),
            ("nt_xent", "cosine", "ring", torch.float32), ("nt_xent", "dot", "gather", torch.float16),
            ("sup_con", "cosine", "ring", torch.float32), ("sup_con", "l2", "gather", torch.float32)]:
        x, y = _x(3, 5, dtype).requires_grad_(True), _x(3, 5, dtype, seed=1).requires_grad_(True)
        kw = dict(similarity=similarity, group=group, group_strategy=strategy)
        ckd.reset_traffic()
        if loss == "info_nce":
            value = ck.info_nce(x, y, **kw)
        elif loss == "clip_loss":
            value = ck.clip_loss(x, y, 10.0, **kw)
        elif loss == "nt_xent":
            value = ck.nt_xent(x, y, **kw)
        else:
            value = ck.sup_con(x, torch.arange(3) % 2, **kw)
        value.backward()
        out[(loss, similarity, strategy, str(dtype))] = ckd.TRAFFIC["p2p"] + ckd.TRAFFIC["collective"]
    return out


SCENARIOS = {f.__name__: f for f in [traffic, 
    mismatch_dim, mismatch_dtype, uneven_rows, uneven_keys, local_failure, local_failure_shape,
    different_options, different_strategies, different_functions, requires_grad_mismatch,
    label_width_mismatch, bad_group_type, nt_xent_mixing, moco_bad_keys, moco_dtype_mismatch,
    after_errors_still_in_sync, deepcopy_keeps_the_group, moco_queue, ddp_info_nce_gather, ddp_info_nce_ring, ddp_clip_ring,
    ddp_clip_gather, ddp_nt_xent_ring]}


def run(names, rank, world, group):
    results = {}
    for name in names:
        try:
            out = SCENARIOS[name](rank, world, group)
            results[name] = {"value": out.detach() if torch.is_tensor(out) else out}
        except Exception as exc:  # noqa: BLE001 (recorded for the test to inspect)
            results[name] = {"error": type(exc).__name__, "message": str(exc)}
    return results
