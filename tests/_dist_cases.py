"""The cases of test_distributed.py, shared by the pytest process (which computes the whole-batch
loss in one process) and the rank processes of tests/_dist_worker.py (which compute the local
losses with group=). A case is a JSON-able dict; ``build`` turns it into the global tensors (the
same on every process: fixed seeds, fp64 on the CPU) and says how each one is sharded."""
from __future__ import annotations

import torch

import contrastive_kernels as ck

ESTIMATORS = {"ce": (0.0, 0.0), "dcl": (0.1, 0.0), "hcl": (0.0, 0.5), "dcl+hcl": (0.2, 1.0)}


def _features(n, d, g):
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=-1)
    return x * (1 + 0.3 * torch.rand(n, 1, dtype=torch.float64, generator=g))


def case_id(c):
    keys = ["loss", "variant", "estimator", "similarity", "strategy", "backend", "reduction",
            "dtype", "B"]
    return "-".join(str(c[k]) for k in keys if c.get(k) not in (None, "")) + (
        "-second" if c.get("second") else "")


def build(c, world):
    """(tensors, sharding, grads): global tensors; sharding[name] = "rows" (split by rows into W
    equal shards) or "replicated"; grads: the names whose gradient is checked."""
    g = torch.Generator().manual_seed(c["seed"])
    b, d = c["B"], c.get("D", 7)
    n = world * b
    loss, variant = c["loss"], c.get("variant", "")
    t, shard, grads = {}, {}, []

    def add(name, value, how, grad=False):
        t[name], shard[name] = value, how
        if grad:
            grads.append(name)

    add("temperature", torch.tensor(c.get("temperature", 0.3), dtype=torch.float64), "replicated",
        True)
    if loss == "info_nce":
        add("q", _features(n, d, g), "rows", True)
        add("p", _features(n, d, g), "rows", True)
        if "queue" in variant or "mixing" in variant:
            add("queue", _features(c.get("K", 13), d, g), "replicated", "queue_grad" in variant)
        if "extra" in variant:
            add("extra", _features(n * 3, d, g).view(n, 3, d), "rows", True)
    elif loss == "nt_xent":
        add("z1", _features(n, d, g), "rows", True)
        add("z2", _features(n, d, g), "rows", True)
    elif loss == "clip_loss":
        del t["temperature"], shard["temperature"]
        grads.remove("temperature")
        add("image", _features(n, d, g), "rows", True)
        add("text", _features(n, d, g), "rows", True)
        add("logit_scale", torch.tensor(4.0, dtype=torch.float64), "replicated", True)
    elif loss == "sup_con":
        add("features", _features(n, d, g), "rows", True)
        if variant == "multi-hot":
            labels = (torch.rand(n, 5, generator=g) < 0.25).long()
        else:  # int: some classes have one member only (anchors without a positive)
            labels = torch.randint(0, max(2, n // 2 + 1), (n,), generator=g)
        add("labels", labels, "rows")
    elif loss == "multi_positive":
        bk = c.get("BK", b + 1)
        k = c.get("K", 5) if "queue" in variant else 0
        add("q", _features(n, d, g), "rows", True)
        add("keys", _features(world * bk, d, g), "rows", True)
        if k:
            add("queue", _features(k, d, g), "replicated", "queue_grad" in variant)
        index = torch.randint(-1, world * bk + k, (n, 3), generator=g)
        index[::4] = -1  # rows without a positive
        add("positive_index", index, "rows")
    else:
        raise ValueError(loss)
    return t, shard, grads


def call(c, t, *, group=None, rank=0, world=1):
    """The loss of case ``c`` on tensors ``t`` (global, or this rank's shards with ``group``)."""
    loss, variant = c["loss"], c.get("variant", "")
    common = dict(similarity=c["similarity"], reduction=c["reduction"], backend=c["backend"],
                  group=group, group_strategy=c["strategy"])
    if loss == "info_nce":
        tau_plus, beta = ESTIMATORS[c.get("estimator", "ce")]
        in_batch = {"in_batch": None, "queue": None, "queue_grad": False}.get(variant, True)
        mixing = None
        extra = t.get("extra")
        if "mixing" in variant:
            in_batch = True
            if group is not None:  # each rank draws from its own generator
                gen = torch.Generator().manual_seed(1000 + rank)
                mixing = ck.Mixing(4, 3, 2, generator=gen)
            else:  # the oracle: every rank's synthetic points as extra negatives
                extra = oracle_synthetic(t["q"], t["queue"], world)
        return ck.info_nce(t["q"], t["p"], t.get("queue"), temperature=t["temperature"],
                           in_batch_negatives=in_batch, tau_plus=tau_plus, beta=beta,
                           extra_negatives=extra, mixing=mixing, **common)
    if loss == "nt_xent":
        tau_plus, beta = ESTIMATORS[c.get("estimator", "ce")]
        return ck.nt_xent(t["z1"], t["z2"], temperature=t["temperature"], tau_plus=tau_plus,
                          beta=beta, **common)
    if loss == "clip_loss":
        return ck.clip_loss(t["image"], t["text"], t["logit_scale"], **common)
    if loss == "sup_con":
        return ck.sup_con(t["features"], t["labels"], temperature=t["temperature"], **common)
    if loss == "multi_positive":
        return ck.multi_positive_info_nce(t["q"], t["keys"], t["positive_index"], t.get("queue"),
                                          temperature=t["temperature"], **common)
    raise ValueError(loss)


def oracle_synthetic(q, queue, world):
    """info_nce(mixing=) under group=: rank r synthesizes for its rows with the generator seeded
    1000 + r; the whole-batch equivalent passes those points as extra_negatives."""
    b = q.shape[0] // world
    out = []
    for r in range(world):
        qr = q[r * b:(r + 1) * b].detach()
        hard = ck.topk_similarity(qr, queue.detach(), 4, backend="reference").indices
        gen = torch.Generator().manual_seed(1000 + r)
        out.append(ck.mix_hard_negatives(qr, queue.detach(), hard, 3, 2, generator=gen,
                                         backend="reference"))
    return torch.cat(out, 0)


def second_derivatives(grads, inputs, sharding):
    """Cases with "second": the gradients of the penalty sum ||g||^2 over the gradients ``grads``
    (taken with create_graph=True) of the row-sharded inputs. Under group= each rank's g is
    factor x its shard of the whole-batch gradient (factor = W for "mean", else 1), so the ranks'
    penalties add up to factor^2 x the whole-batch penalty, and their gradients combine (cat of
    the shards, sum of the replicated) to factor^2 x the whole-batch ones."""
    penalty = sum((g * g).sum() for g, how in zip(grads, sharding) if how == "rows")
    second = torch.autograd.grad(penalty, inputs, allow_unused=True)
    return [torch.zeros_like(x) if h is None else h for h, x in zip(second, inputs)]


def output_positions(c, world, b):
    """For reduction "none": rank r's local outputs sit at these positions of the whole-batch
    output (nt_xent's local views are cat([z1_r, z2_r]); the whole batch is cat([z1, z2]))."""
    n = world * b
    pos = []
    for r in range(world):
        rows = torch.arange(r * b, (r + 1) * b)
        pos.append(torch.cat([rows, n + rows]) if c["loss"] == "nt_xent" else rows)
    return pos


def n_outputs(c, world):
    return (2 if c["loss"] == "nt_xent" else 1) * world * c["B"]


def weights(c, world):
    """Fixed unequal weights that turn "none" outputs into a scalar (every row's gradient counts)."""
    return torch.linspace(0.5, 1.5, n_outputs(c, world), dtype=torch.float64)


def shard(x, how, rank, world):
    if how == "replicated":
        return x
    m = x.shape[0] // world
    return x[rank * m:(rank + 1) * m]
