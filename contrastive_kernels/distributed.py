"""torch.distributed support for ``group=`` (DESIGN.md, "group=").

The convention
--------------
Each rank holds a shard of the batch (the same number of rows on every rank: uneven local batches
are rejected on every rank with a ValueError). Its rows are contrasted against the keys of *all*
ranks, and it returns its *local* loss:

- ``reduction="mean"``: the sum of its own rows' losses divided by the mean number of rows per
  rank, ``L_r = W * sum_{i in r} loss_i / (number of rows of all ranks)``. For every loss whose
  rows all count this is the plain mean over the rank's rows; for ``sup_con`` and
  ``multi_positive_info_nce``, whose rows without a positive are left out of the mean, the count
  of rows that do count is summed over the ranks (one all-reduce of a scalar). Either way the mean
  of the ranks' losses is the whole-batch loss.
- ``"sum"``: the sum over its own rows; the ranks' losses add up to the whole-batch sum.
- ``"none"``: its own rows' losses (``nt_xent``: its 2B views, ``cat([z1_r, z2_r])`` order).

Backward sends each key's gradient back to the rank that owns it, so a rank's gradient for its
shard is that of the *sum* of all ranks' losses. DDP divides the summed gradients by the world
size, so training under DDP follows the whole-batch loss exactly (open_clip's local_loss +
gather_with_grad convention). Replicated inputs (temperature, logit_scale, a queue) get a gradient
on every rank whose sum over the ranks is the gradient of the sum of the ranks' losses; DDP's
average of the parameters they come from is again the whole-batch gradient.

What is sharded (N = W * B rows in all, global index of rank r's row i = r * B + i):

- ``info_nce``: query and positive_key rows; the in-batch negatives are the positive keys of all
  ranks; the queue is replicated (identical on every rank, as MoCo keeps it: see
  ``nn.MoCoQueue(group=)``) and handled locally; extra_negatives are per row, hence local; mixing
  synthesizes from the replicated queue for the local rows, with the draws of the rank's own
  generator (seed it per rank for independent draws).
- ``nt_xent``: the views z1, z2 of all ranks are the columns: each view's negatives are the other
  2N - 2 views of the whole batch. (mixing is not supported with group=.)
- ``clip_loss``: images and texts of all ranks, both directions: each local image against all
  texts, each local text against all images.
- ``sup_con``: features and labels of all ranks (labels gathered, or carried around the ring).
- ``multi_positive_info_nce``: query rows and keys are both sharded (the key count per rank may
  differ from the query rows, but must be equal across ranks); ``positive_index`` holds *global*
  column indices: ``[0, W * K_local)`` index the keys of all ranks in rank order (rank s's key j is
  ``s * K_local + j``), ``W * K_local + t`` is row t of the replicated queue. For keys that are the
  same on every rank (class text embeddings), do not pass group=: each rank's loss is then already
  its local one.

Strategies (``group_strategy=``)
--------------------------------
- ``"gather"``: all-gather the keys with a gradient that is reduce-scattered in backward (summed
  over the ranks, each rank keeping its own rows), then run the ordinary backend on the local rows
  against all N keys (self / partner exclusions offset by the rank's row offset). Per rank: memory
  O(N D) (the gathered keys and their gradient), compute B x N x D. CLIP gathers the texts only:
  the backend's pass of the local images against all texts also yields every text's column LSE
  over the local images (N floats), and those partial statistics are merged across the ranks in
  log-sum-exp form (a max all-reduce and a reduce-scatter of N floats; backward all-gathers the
  owners' column gradients, N floats), so each direction costs one pass, not two.
- ``"ring"``: the key shards travel around the ring (rank r sends to r+1 and receives from r-1)
  with ``torch.distributed.batch_isend_irecv``; while the next shard is in flight the backend's
  ``lse_stats`` runs on the shard in hand and the per-row statistics merge exactly in log-sum-exp
  form. Backward is a second trip: each shard travels again together with the column statistics
  backward needs, and a partial gradient for that shard's keys follows it, one step behind,
  accumulating every rank's contribution, and finally returns to its owner. Per rank: memory
  O(B D) whatever W.

  CLIP's columns: a text's column log-sum-exp runs over the images of all ranks. The text shards
  travel; the rank holding text shard s computes, in the same pass as its images' row statistics,
  the column log-sum-exp of shard s over its own images, and that partial column statistic travels
  one step behind the shard, merged (logaddexp) at every rank; after the last rank a final hop of
  B floats brings it home. One pass, no second direction.

  Backward reuses the backend: for each block it re-runs ``lse_stats`` under autograd and
  backpropagates the block's share of the global statistics, dR_t = dR * exp(R_t - R) (and the
  same for the columns), which is exact because d logsumexp_t(R_t) / dR_t = exp(R_t - R).

Errors: before any collective, every call exchanges a small metadata vector (shapes, dtypes,
options, which tensors need a gradient) with ``all_gather``; a disagreement raises the same
ValueError on every rank, and a rank whose arguments fail the local checks makes every other rank
raise too (``raise_everywhere``), so a bad call never leaves the other ranks hanging in a
collective. Backward is collective as well: every rank must call backward on its loss.
"""
from __future__ import annotations

import math
import types
from typing import List, Sequence

import torch
import torch.distributed as dist

from . import losses, reference
from ._common import (FLOAT_DTYPES, GROUP_STRATEGIES, REDUCTIONS, SIMILARITIES,
                      acc_dtype, first_order, pack_multi_hot, to_acc)

# --------------------------------------------------------------------------------------------
# the group
# --------------------------------------------------------------------------------------------


def check_group(group):
    """``group`` if it is None or a usable process group this process belongs to; else a clear
    ValueError/TypeError."""
    if group is None:
        return None
    if not dist.is_available():
        raise ValueError("group= needs torch.distributed, which this build of torch lacks")
    if not dist.is_initialized():
        raise ValueError("group= needs an initialized process group: call "
                         "torch.distributed.init_process_group(...) first (or pass group=None)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError("group must be None or a torch.distributed ProcessGroup (e.g. "
                        "torch.distributed.group.WORLD or one from torch.distributed.new_group), "
                        f"got {type(group).__name__}")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"group is not a usable process group: {exc}") from None
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group=")
    return group


def world_size(group) -> int:
    return dist.get_world_size(group)


def _meta_device(group) -> torch.device:
    """The device of the metadata collectives: the CPU unless the group only speaks NCCL. Chosen
    from the group alone, so that every rank picks the same one whatever its arguments."""
    name = str(dist.get_backend(group)).lower()
    if "nccl" in name and "gloo" not in name:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# metadata: agree on shapes and options before any collective that depends on them
# --------------------------------------------------------------------------------------------

_OP_NAMES = ("info_nce", "nt_xent", "clip_loss", "sup_con", "multi_positive_info_nce",
             "MoCoQueue.enqueue")
_DTYPE_NAMES = {dt: str(dt).replace("torch.", "") for dt in FLOAT_DTYPES}
_DTYPE_CODES = {dt: i for i, dt in enumerate(FLOAT_DTYPES)}
_META_LEN = 64


def _dtype_code(dtype):
    return _DTYPE_CODES.get(dtype, -1)


class _Meta:
    """What one rank's call looks like; ``agree`` all-gathers it and checks that ranks match."""

    def __init__(self, op: str):
        self.op = op
        self.names: List[str] = []
        self.values: List[float] = []
        self.kinds: List[str] = []

    def add(self, name, value, kind="same"):
        """kind: "same" (must be equal), "rows" (a row count: uneven batches), "dtype", "choice:
        a,b,c" (an index into options), "flag" (bool), or "free" (may differ: not checked)."""
        if value is None:
            value = -1
        elif isinstance(value, bool):
            value = int(value)
        self.names.append(name)
        self.values.append(float(value))
        self.kinds.append(kind)
        return self

    def choice(self, name, value, options):
        return self.add(name, options.index(value), "choice:" + ",".join(options))

    def show(self, i, value):
        kind = self.kinds[i]
        if value == -1 and kind != "same":
            return "none"
        if kind == "dtype":
            if 0 <= value < len(FLOAT_DTYPES):
                return _DTYPE_NAMES[FLOAT_DTYPES[int(value)]]
            return "not floating point"
        if kind == "flag":
            return str(bool(value))
        if kind.startswith("choice:"):
            return repr(kind[7:].split(",")[int(value)])
        return f"{int(value)}" if float(value).is_integer() else f"{value:g}"


def _all_gather_table(group, vector: List[float]):
    dev = _meta_device(group)
    mine = torch.tensor(vector + [0.0] * (_META_LEN - len(vector)), dtype=torch.float64, device=dev)
    out = torch.empty(world_size(group) * _META_LEN, dtype=torch.float64, device=dev)
    _all_gather_into(out, mine, group)
    return out.view(-1, _META_LEN).tolist()


def _raise_reported_failures(group, table, op, my_message=None):
    """Some rank failed its local checks: every rank learns why and raises."""
    messages = [None] * len(table)
    dist.all_gather_object(messages, my_message, group=group)
    failed = [r for r, row in enumerate(table) if row[0] != 0]
    detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    who = (f"ranks {', '.join(map(str, failed))} rejected their" if len(failed) > 1
           else f"rank {failed[0]} rejected its")
    raise ValueError(f"{op} with group=: {who} arguments, so no rank can go on ({detail})")


def agree(group, meta: _Meta):
    """All-gather ``meta`` and raise the same ValueError on every rank if the ranks disagree."""
    if len(meta.values) + 3 > _META_LEN:
        raise RuntimeError("internal: too many metadata fields")
    table = _all_gather_table(group, [0.0, float(_OP_NAMES.index(meta.op)), float(len(meta.values))]
                              + meta.values)
    if any(row[0] != 0 for row in table):
        _raise_reported_failures(group, table, meta.op)
    ops = [int(row[1]) for row in table]
    if len(set(ops)) > 1:
        calls = ", ".join(f"rank {r}: {_OP_NAMES[o]}" for r, o in enumerate(ops))
        raise ValueError(f"group=: the ranks called different functions ({calls}); every rank must "
                         "make the same calls with group= in the same order")
    problems = []
    for i, name in enumerate(meta.names):
        if meta.kinds[i] == "free":
            continue
        column = [row[3 + i] for row in table]
        if len(set(column)) == 1:
            continue
        per_rank = ", ".join(f"{meta.show(i, v)} on rank {r}" for r, v in enumerate(column))
        if meta.kinds[i] == "rows":
            problems.append(f"uneven local batch sizes are not supported: the rows of {name} "
                            f"number {per_rank}; "
                            "every rank must hold the same number of rows (drop the last, "
                            "incomplete batch, e.g. DataLoader(drop_last=True) with a "
                            "DistributedSampler)")
        else:
            problems.append(f"{name} differs between ranks: {per_rank}")
    if problems:
        raise ValueError(f"{meta.op} with group=: the ranks disagree: " + "; ".join(problems))
    return table


def raise_everywhere(group, op: str, exc: BaseException) -> None:
    """Called on a rank whose arguments failed the local checks: tell the other ranks (waiting in
    ``agree``) so that they raise too instead of hanging. Returns; the caller re-raises ``exc``."""
    try:
        check_group(group)
    except (TypeError, ValueError):
        return  # no usable group: nothing to tell anyone
    op_index = _OP_NAMES.index(op) if op in _OP_NAMES else 0
    table = _all_gather_table(group, [1.0, float(op_index), 0.0])
    try:
        _raise_reported_failures(group, table, op, f"{type(exc).__name__}: {exc}")
    except ValueError:
        pass


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------

# bytes this process has sent for group= (the benchmark reports them next to the formulas):
# point-to-point messages exactly; an all-gather / reduce-scatter of n bytes per rank as the
# (W - 1) * n a ring algorithm sends
TRAFFIC = {"p2p": 0, "collective": 0}


def reset_traffic():
    TRAFFIC.update(p2p=0, collective=0)


def _count(kind, nbytes):
    TRAFFIC[kind] += int(nbytes)


# torch 2.13 renames the tensor collectives (*_single); older versions (the GPU machine's 2.11) only
# have the *_tensor names
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward sums each row's gradient over the ranks and hands
    every rank the gradient of its own rows (a reduce-scatter). Both directions are linear and
    each one's backward is the other, so second derivatives (``backend="reference"``) go through."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x, group)
        _count("collective", (world - 1) * x.numel() * x.element_size())
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatterRows.apply(grad, ctx.group, ctx.world), None, None


class _ReduceScatterRows(torch.autograd.Function):
    """The sum over the ranks of ``x`` (W * n, ...), of which every rank keeps its own block of n
    rows; backward all-gathers the blocks' gradients (``_GatherRows``)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
        _reduce_scatter_into(out, x, group=group)
        _count("collective", (world - 1) * out.numel() * out.element_size())
        return out

    @staticmethod
    def backward(ctx, grad):
        return _GatherRows.apply(grad, ctx.group, ctx.world), None, None


def gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """``cat`` of every rank's ``x`` (same shape on all ranks) in rank order, with the gradient
    convention above when ``x`` requires grad."""
    if world == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, group, world)
    x = x.detach().contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_into(out, x, group)
    _count("collective", (world - 1) * x.numel() * x.element_size())
    return out


def all_gather_rows(keys: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``keys`` (n_r, D), concatenated in rank order, without gradient (MoCoQueue
    under DDP). Row counts may differ between ranks; D and dtype must not (a ValueError on every
    rank otherwise)."""
    group = check_group(group)
    meta = _Meta("MoCoQueue.enqueue")
    meta.add("keys rows", keys.shape[0], "free")
    meta.add("keys feature dimension", keys.shape[1])
    meta.add("keys dtype", _dtype_code(keys.dtype), "dtype")
    table = agree(group, meta)
    w = len(table)
    if w == 1:
        return keys.detach()
    rows = [int(row[3]) for row in table]
    most = max(rows)
    padded = keys.detach().new_zeros((most, keys.shape[1]))
    padded[:keys.shape[0]] = keys.detach()
    out = padded.new_empty((w * most, keys.shape[1]))
    _all_gather_into(out, padded, group)
    return torch.cat([out[r * most:r * most + n] for r, n in enumerate(rows)], 0)


def _merge_col_lse(partial, group, world, rank):
    """Each rank has the column LSE of all N keys over its own rows (N,); every rank gets its own
    keys' column LSE over the rows of all ranks (B,): log sum_r exp(partial_r), as a max
    all-reduce (a constant shift) and a reduce-scatter of exp(partial - max). Plain autograd
    through ``_ReduceScatterRows`` gives the backward, d partial_r = all-gather(dC / S) *
    exp(partial_r - max) (N floats), and its derivatives in turn."""
    if world == 1:
        return partial
    top = partial.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    _count("collective", 2 * (world - 1) * top.numel() // world * top.element_size())
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    summed = _ReduceScatterRows.apply(torch.exp(partial - top), group, world)
    # a column that is -inf on every rank sums to 0: log 0 = -inf, with a zero gradient (not NaN)
    some = summed > 0
    own = torch.log(torch.where(some, summed, torch.ones_like(summed)))
    n = summed.shape[0]
    return torch.where(some, own, torch.full_like(own, -math.inf)) + top[rank * n:(rank + 1) * n]


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# --------------------------------------------------------------------------------------------
# the ring
# --------------------------------------------------------------------------------------------


class _Ring:
    """Rank r sends to r+1 and receives from r-1 (ranks of ``group``, mod W)."""

    def __init__(self, group, world, rank):
        self.group, self.world, self.rank = group, world, rank
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)

    def _start(self, sends, recvs, tag):
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i)
               for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i)
                for i, t in enumerate(recvs)]
        _count("p2p", sum(t.numel() * t.element_size() for t in sends))
        return dist.batch_isend_irecv(ops) if ops else []

    def circulate(self, static: Sequence[torch.Tensor], compute, merge):
        """Pass this rank's ``static`` payload around the ring. At step t (0..W-1) the rank holds
        the payload of shard s = (rank - t) mod W and calls ``compute(s, payload)`` while the next
        one is in flight. ``compute`` returns a list of tensors (a partial statistic of shard s:
        the "dynamic" payload) or None. The dynamic payload follows its shard one step behind,
        ``merge(received, partial)`` at every rank, and finally returns to its owner: the return
        value is this rank's own shard's dynamic payload, merged over all ranks (or None)."""
        world = self.world
        current = [t.contiguous() for t in static]
        dynamic = None
        for t in range(world):
            shard = (self.rank - t) % world
            upcoming = [torch.empty_like(x) for x in current] if t < world - 1 else None
            incoming = None
            if t >= 1 and dynamic is not None:
                incoming = [torch.empty_like(x) for x in dynamic]
            works = self._start(current if upcoming is not None else [], upcoming or [], 0)
            if incoming is not None:  # separate tags: static and dynamic never cross-match
                works += self._start(dynamic, incoming, 64)
            partial = compute(shard, current)
            for w in works:
                w.wait()
            # drop every reference to what was sent before the next buffers are allocated: a
            # rank holds two shards (the one in hand and the next) and one dynamic payload
            del works
            if partial is not None:
                partial = [p.contiguous() for p in partial]
                dynamic = partial if t == 0 else merge(incoming, partial)
            del partial, incoming
            if upcoming is not None:
                current = upcoming
            del upcoming
        if dynamic is not None and world > 1:  # the last hop: home to the owner
            home = [torch.empty_like(x) for x in dynamic]
            for w in self._start(dynamic, home, 64):
                w.wait()
            dynamic = home
        return dynamic


def _shard_pairs(pairs, shard, n):
    """Global column indices (B, P) -> indices into shard ``shard`` of ``n`` columns (-1 else)."""
    local = pairs - shard * n
    return torch.where((pairs >= 0) & (local >= 0) & (local < n), local, torch.full_like(pairs, -1))


def _pair_logits(q, a, c, k, b, d, pairs):
    """l_ip = a_i b_p <q_i, k_p> + c_i + d_p for the (row, column) pairs ``pairs`` (B, P) (-1:
    none, giving 0), fp32."""
    valid = pairs >= 0
    idx = pairs.clamp(min=0)
    out = torch.einsum("bd,bpd->bp", to_acc(q), to_acc(k[idx])) * a[:, None]
    if b is not None:
        out = out * b[idx]
    if c is not None:
        out = out + c[:, None]
    if d is not None:
        out = out + d[idx]
    return torch.where(valid, out, torch.zeros_like(out))


def _block(ops, q, a, c, k, b, d, q_labels, k_labels, gammas, want_col_lse, exclude, pairs):
    row_lse, pos_sum, pos_count, col_lse = ops.lse_stats(
        q, k, a, b, c, d, gammas=gammas, exclude=exclude, q_labels=q_labels, k_labels=k_labels,
        want_col_lse=want_col_lse)
    pair = _pair_logits(q, a, c, k, b, d, pairs) if pairs is not None else None
    return row_lse, pos_sum, pos_count, col_lse, pair


def _share(total, part):
    """exp(part - total) with 0 where the total is -inf (d logsumexp / d part)."""
    return torch.where(total == -math.inf, torch.zeros_like(total), torch.exp(part - total))


def _unpack(payload, present):
    it = iter(payload)
    return [next(it) if p else None for p in present]


class _RingStats(torch.autograd.Function):
    """``lse_stats`` of the local rows against the keys of every rank, with the keys circulating
    (see the module docstring). Inputs: the local rows (q, a, c), the local key shard (k, b, d),
    labels, ``exclude`` (B, E) local indices into the rank's own shard, ``pairs`` (B, P) global
    column indices. Outputs: row_lse (G, B), pos_sum (B,), pos_count (B,), col_lse of the local
    shard over all ranks' rows (or empty), pair logits (B, P) (or empty)."""

    @staticmethod
    def forward(ctx, ring, ops, gammas, want_col_lse, q, a, c, k, b, d, q_labels, k_labels,
                exclude, pairs):
        acc = acc_dtype(q.dtype)
        bsz, n = q.shape[0], k.shape[0]
        present = [True, b is not None, d is not None, k_labels is not None]
        state = {"row": torch.full((len(gammas), bsz), -math.inf, dtype=acc, device=q.device),
                 "pos": torch.zeros(bsz, dtype=acc, device=q.device),
                 "count": torch.zeros(bsz, dtype=acc, device=q.device),
                 "pair": None}

        def compute(shard, payload):
            k_s, b_s, d_s, kl_s = _unpack(payload, present)
            mine = shard == ring.rank
            row, pos, count, col, pair = _block(
                ops, q, a, c, k_s, b_s, d_s, q_labels, kl_s, gammas, want_col_lse,
                exclude if mine else None,
                _shard_pairs(pairs, shard, n) if pairs is not None else None)
            state["row"] = torch.logaddexp(state["row"], row.to(acc))
            if q_labels is not None:
                state["pos"] += pos.to(acc)
                state["count"] += count.to(acc)
            if pair is not None:
                state["pair"] = pair if state["pair"] is None else state["pair"] + pair
            return [col.to(acc)] if want_col_lse else None

        static = [t for t, p in zip((k, b, d, k_labels), present) if p]
        col = ring.circulate(  # merged into the received buffer, which is ours
            static, compute, lambda got, part: [torch.logaddexp(got[0], part[0], out=got[0])])
        col_lse = col[0] if want_col_lse else q.new_empty(0, dtype=acc)
        pair = state["pair"] if pairs is not None else q.new_empty(0, dtype=acc)
        ctx.ring, ctx.ops, ctx.gammas, ctx.want_col_lse = ring, ops, gammas, want_col_lse
        ctx.present = present
        ctx.save_for_backward(q, a, c, k, b, d, q_labels, k_labels, exclude, pairs, state["row"],
                              col_lse)
        ctx.mark_non_differentiable(state["count"])
        return state["row"], state["pos"], state["count"], col_lse, pair

    @staticmethod
    @first_order("group_strategy='ring'", instead="group_strategy='gather' with backend='reference'")
    def backward(ctx, d_row, d_pos, _d_count, d_col, d_pair):
        q, a, c, k, b, d, q_labels, k_labels, exclude, pairs, row_lse, col_lse = ctx.saved_tensors
        ring, ops, gammas, want_col_lse = ctx.ring, ctx.ops, ctx.gammas, ctx.want_col_lse
        need = ctx.needs_input_grad[4:10]  # q, a, c, k, b, d
        acc = row_lse.dtype
        n = k.shape[0]
        row_inputs = (q, a, c)
        row_grads = [torch.zeros(t.shape, dtype=acc, device=t.device) if (t is not None and need[i])
                     else None for i, t in enumerate(row_inputs)]
        key_need = [need[3], need[4] and b is not None, need[5] and d is not None]
        any_key = any(key_need)
        present = ctx.present + [want_col_lse, want_col_lse]

        def compute(shard, payload):
            k_s, b_s, d_s, kl_s, c_s, dc_s = _unpack(payload, present)
            mine = shard == ring.rank
            leaves = []
            with torch.enable_grad():
                ins = []
                for t, want in zip(row_inputs + (k_s, b_s, d_s),
                                   list(need[:3]) + key_need):
                    if t is None:
                        ins.append(None)
                        continue
                    x = t.detach()
                    if want:
                        x.requires_grad_(True)
                        leaves.append(x)
                    ins.append(x)
                qq, aa, cc, kk, bb, dd = ins
                row, pos, _count, col, pair = _block(
                    ops, qq, aa, cc, kk, bb, dd, q_labels, kl_s, gammas, want_col_lse,
                    exclude if mine else None,
                    _shard_pairs(pairs, shard, n) if pairs is not None else None)
                outs = [row]
                grads = [d_row * _share(row_lse, row.detach().to(acc))]
                if q_labels is not None:
                    outs.append(pos)
                    grads.append(d_pos)
                if want_col_lse:
                    outs.append(col)
                    grads.append(dc_s * _share(c_s, col.detach().to(acc)))
                if pair is not None:
                    outs.append(pair)
                    grads.append(d_pair)
                keep = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if o.requires_grad]
                got = torch.autograd.grad([o for o, _ in keep], leaves, [g for _, g in keep],
                                          allow_unused=True) if keep else [None] * len(leaves)
            got = iter(got)
            key_part = []
            for i, t in enumerate(ins):
                wanted = (list(need[:3]) + key_need)[i] and t is not None
                if not wanted:
                    continue
                g = next(got)
                g = torch.zeros(t.shape, dtype=acc, device=t.device) if g is None else g.to(acc)
                if i < 3:
                    row_grads[i] += g
                else:
                    key_part.append(g)
            return key_part if any_key else None

        static = [t for t, p in zip((k, b, d, k_labels), ctx.present) if p]
        if want_col_lse:
            static += [col_lse, d_col.to(acc)]
        key_grads = ring.circulate(static, compute,
                                   lambda got, part: [x.add_(y) for x, y in zip(got, part)])
        key_grads = iter(key_grads or [])
        outs_k = []
        for t, want in zip((k, b, d), key_need):
            outs_k.append(next(key_grads).to(t.dtype) if want else None)
        outs_q = [g.to(t.dtype) if g is not None else None for g, t in zip(row_grads, row_inputs)]
        return (None, None, None, None, *outs_q, *outs_k, None, None, None, None)


# --------------------------------------------------------------------------------------------
# the two strategies behind one interface
# --------------------------------------------------------------------------------------------


def _reference_topk(query, bank, k, *, similarity, exclude_index, query_labels, bank_labels):
    scores = reference.similarity_matrix(query.float(), bank.float(), similarity) + 0.0
    if exclude_index is not None:
        ex = exclude_index if exclude_index.dim() == 2 else exclude_index[:, None]
        cols = torch.arange(bank.shape[0], device=query.device)
        for e in ex.unbind(1):
            scores = scores.masked_fill(cols[None, :] == e[:, None], -math.inf)
    if query_labels is not None:
        scores = scores.masked_fill(query_labels[:, None] == bank_labels[None, :], -math.inf)
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def _reference_mixed_dots(q, mix_query, negatives, hard_index, draws):
    h = reference.mix_points(mix_query.detach(), negatives.detach(), hard_index, draws)
    return torch.einsum("bd,btd->bt", to_acc(q), to_acc(h))


# backend="reference" under group=: the same compositions over the spec's lse_stats
REFERENCE_OPS = types.SimpleNamespace(NAME="reference", lse_stats=reference.lse_stats,
                                      topk=_reference_topk, mixed_dots=_reference_mixed_dots)


def _ops(backend, device):
    from .functional import _is_reference, resolve_backend

    ops = resolve_backend(backend, "loss", device)
    return REFERENCE_OPS if _is_reference(ops) else ops


class _Setup:
    """One call's group, rank, world, strategy and backend ops, once the ranks agree."""

    def __init__(self, group, meta: _Meta, strategy, backend, device):
        self.group = group
        self.world = world_size(group)
        self.rank = dist.get_rank(group)
        agree(group, meta)
        self.strategy = strategy
        self.ops = _ops(backend, device)
        self.ring = _Ring(group, self.world, self.rank) if strategy == "ring" else None

    def stats(self, q, rows: losses.Side, k, similarity, scale, *, gammas=(1.0,), exclude=None,
              q_labels=None, k_labels=None, pairs=None, want_col_lse=False):
        """Statistics of the local rows ``q`` against the keys ``k`` of every rank:
        (row_lse (G, B), pos_sum, pos_count, col_lse of the local keys over every rank's rows
        (ring only), pair logits (B, P) or None). ``exclude``: local indices into the rank's own
        keys; ``pairs``: global column indices."""
        if self.strategy == "ring":
            cols = losses.col_side(k, similarity, scale)
            row, pos, count, col, pair = _RingStats.apply(
                self.ring, self.ops, tuple(gammas), want_col_lse, q, rows.scale, rows.bias, k,
                cols.scale, cols.bias, q_labels, k_labels, exclude, pairs)
            return row, pos, count, col, (pair if pairs is not None else None)
        keys = gather_rows(k, self.group, self.world)
        labels = gather_rows(k_labels, self.group, self.world) if k_labels is not None else None
        cols = losses.col_side(keys, similarity, scale)
        if exclude is not None:
            exclude = exclude + self.rank * k.shape[0]
        row, pos, count, col = self.ops.lse_stats(q, keys, rows.scale, cols.scale, rows.bias,
                                                  cols.bias, gammas=tuple(gammas),
                                                  exclude=exclude, q_labels=q_labels,
                                                  k_labels=labels, want_col_lse=want_col_lse)
        if want_col_lse:  # every key's column LSE over the local rows -> the own keys' over all
            col = _merge_col_lse(col, self.group, self.world, self.rank)
        pair = None
        if pairs is not None:
            picked = losses.paired_logits(q, rows, keys[pairs.clamp(min=0)], similarity, scale)
            pair = torch.where(pairs >= 0, picked, torch.zeros_like(picked))
        return row, pos, count, (col if want_col_lse else None), pair

    def reduce(self, loss, reduction, keep=None):
        """The local loss of the convention (module docstring)."""
        if keep is not None:
            loss = torch.where(keep, loss, torch.zeros_like(loss))
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        if keep is None:
            return loss.sum() / max(loss.numel(), 1)
        count = keep.sum().to(loss.dtype)
        if self.world > 1:
            count = _all_reduce_sum(count, self.group)
        return loss.sum() * self.world / count.clamp(min=1)


def _common_meta(meta: _Meta, x, similarity, reduction, strategy):
    meta.add("feature dimension", x.shape[-1])
    meta.add("dtype", _dtype_code(x.dtype), "dtype")
    meta.choice("device type", x.device.type if x.device.type in ("cpu", "cuda") else "other",
                ("cpu", "cuda", "other"))
    meta.choice("similarity", similarity, SIMILARITIES)
    meta.choice("reduction", reduction, REDUCTIONS)
    meta.choice("group_strategy", strategy, GROUP_STRATEGIES)
    meta.add("torch.is_grad_enabled()", torch.is_grad_enabled(), "flag")
    return meta


def _scalar_meta(meta: _Meta, name, value):
    if torch.is_tensor(value):
        meta.add(f"{name} is a tensor", 1, "flag")
        meta.add(f"{name} requires grad", value.requires_grad, "flag")
    else:
        meta.add(f"{name} is a tensor", 0, "flag")
        meta.add(name, float(value))
    return meta


# --------------------------------------------------------------------------------------------
# the losses (called by functional.py after its checks; arguments are valid)
# --------------------------------------------------------------------------------------------


def info_nce(query, positive_key, queue=None, *, temperature, similarity, in_batch_negatives,
             tau_plus, beta, extra_negatives, mixing, reduction, backend, group,
             group_strategy="gather"):
    meta = _common_meta(_Meta("info_nce"), query, similarity, reduction, group_strategy)
    meta.add("query", query.shape[0], "rows")
    meta.add("query requires grad", query.requires_grad, "flag")
    meta.add("positive_key requires grad", positive_key.requires_grad, "flag")
    meta.add("in_batch_negatives", in_batch_negatives, "flag")
    meta.add("queue rows", None if queue is None else queue.shape[0])
    meta.add("queue requires grad", queue is not None and queue.requires_grad, "flag")
    meta.add("extra_negatives per row",
             None if extra_negatives is None else extra_negatives.shape[1])
    meta.add("tau_plus", tau_plus).add("beta", beta)
    meta.add("mixing", None if mixing is None else mixing.n_total)
    _scalar_meta(meta, "temperature", temperature)
    run = _Setup(group, meta, group_strategy, backend, query.device)

    b = query.shape[0]
    temperature, scale = losses._temperature_and_scale(temperature, query)
    rows = losses.row_side(query, similarity, scale)
    l_pos = losses.paired_logits(query, rows, positive_key, similarity, scale)
    debiased = tau_plus != 0.0 or beta != 0.0
    gammas = (1.0 + beta, beta) if debiased else (1.0,)
    parts, own, n_neg = [], [], 0
    if in_batch_negatives:
        # cross-entropy keeps the positive (own column) in the sum; DCL/HCL sums negatives only
        exclude = torch.arange(b, device=query.device)[:, None] if debiased else None
        parts.append(run.stats(query, rows, positive_key, similarity, scale, gammas=gammas,
                               exclude=exclude)[0])
        n_neg += run.world * b - 1
    if queue is not None and queue.shape[0] > 0:  # replicated: a local computation
        cols = losses.col_side(queue, similarity, scale)
        parts.append(run.ops.lse_stats(query, queue, rows.scale, cols.scale, rows.bias, cols.bias,
                                       gammas=gammas)[0])
        n_neg += queue.shape[0]
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        own.append(losses.paired_logits(query, rows, extra_negatives, similarity, scale))
        n_neg += extra_negatives.shape[1]
    if mixing is not None and mixing.n_total > 0:
        hard = run.ops.topk(query.detach(), queue.detach(), mixing.n_hard, similarity="dot",
                            exclude_index=None, query_labels=None, bank_labels=None)[1]
        losses.add_synthetic_terms(run.ops, query, rows, query.detach(), queue.detach(), hard, mixing,
                                   scale, gammas, parts, own)
        n_neg += mixing.n_total
    loss = losses._finish(l_pos, parts, own, n_neg, tau_plus, beta, temperature,
                          positive_in_parts=in_batch_negatives and not debiased)
    return run.reduce(loss, reduction)


def nt_xent(z1, z2, *, temperature, similarity, tau_plus, beta, mixing, reduction, backend, group,
            group_strategy="gather"):
    meta = _common_meta(_Meta("nt_xent"), z1, similarity, reduction, group_strategy)
    meta.add("z1", z1.shape[0], "rows")
    meta.add("z1 requires grad", z1.requires_grad, "flag")
    meta.add("z2 requires grad", z2.requires_grad, "flag")
    meta.add("tau_plus", tau_plus).add("beta", beta)
    meta.add("mixing", None if mixing is None else mixing.n_total)
    _scalar_meta(meta, "temperature", temperature)
    run = _Setup(group, meta, group_strategy, backend, z1.device)
    if mixing is not None:
        raise ValueError("nt_xent: mixing is not supported with group= (mining hard negatives "
                         "among the views of every rank needs them all on each rank); use "
                         "info_nce(mixing=) with a queue, or nt_xent without group=")

    b = z1.shape[0]
    z = torch.cat([z1, z2], 0)
    temperature, scale = losses._temperature_and_scale(temperature, z)
    rows = losses.row_side(z, similarity, scale)
    idx = torch.arange(2 * b, device=z.device)
    partner = (idx + b) % (2 * b)
    l_pos = losses.paired_logits(z, rows, z[partner], similarity, scale)
    debiased = tau_plus != 0.0 or beta != 0.0
    gammas = (1.0 + beta, beta) if debiased else (1.0,)
    # the columns: every rank's cat([z1_r, z2_r]); self and partner are in the rank's own shard
    exclude = torch.stack([idx, partner], 1) if debiased else idx[:, None]
    parts = [run.stats(z, rows, z, similarity, scale, gammas=gammas, exclude=exclude)[0]]
    loss = losses._finish(l_pos, parts, [], 2 * run.world * b - 2, tau_plus, beta, temperature,
                          positive_in_parts=True)
    return run.reduce(loss, reduction)


def clip_loss(image_features, text_features, logit_scale, *, similarity, reduction, backend, group,
              group_strategy="gather"):
    meta = _common_meta(_Meta("clip_loss"), image_features, similarity, reduction, group_strategy)
    meta.add("image_features", image_features.shape[0], "rows")
    meta.add("image_features requires grad", image_features.requires_grad, "flag")
    meta.add("text_features requires grad", text_features.requires_grad, "flag")
    _scalar_meta(meta, "logit_scale", logit_scale)
    run = _Setup(group, meta, group_strategy, backend, image_features.device)

    scale = losses._scale(logit_scale, image_features)
    img_rows = losses.row_side(image_features, similarity, scale)
    diagonal = losses.paired_logits(image_features, img_rows, text_features, similarity, scale)
    # one pass of the local images against the texts of every rank; each text's column LSE over
    # the images of every rank comes from merging the ranks' partial column statistics (ring:
    # they follow the text shard around; gather: a reduce-scatter of N floats)
    row, _, _, txt_lse, _ = run.stats(image_features, img_rows, text_features, similarity, scale,
                                      want_col_lse=True)
    per_pair = 0.5 * ((row[0] - diagonal) + (txt_lse - diagonal))
    return run.reduce(per_pair, reduction)


def sup_con(features, labels, *, temperature, similarity, reduction, backend, group,
            group_strategy="gather"):
    meta = _common_meta(_Meta("sup_con"), features, similarity, reduction, group_strategy)
    meta.add("features", features.shape[0], "rows")
    meta.add("features requires grad", features.requires_grad, "flag")
    meta.choice("labels kind", "int" if labels.dim() == 1 else "multi-hot", ("int", "multi-hot"))
    meta.add("labels classes (multi-hot columns)", labels.shape[1] if labels.dim() == 2 else None)
    _scalar_meta(meta, "temperature", temperature)
    run = _Setup(group, meta, group_strategy, backend, features.device)

    b = features.shape[0]
    scale = 1.0 / losses._scale(temperature, features)
    rows = losses.row_side(features, similarity, scale)
    lab = labels.long() if labels.dim() == 1 else pack_multi_hot(labels)
    self_index = torch.arange(b, device=features.device)[:, None]
    row_lse, pos_sum, pos_count, _, _ = run.stats(features, rows, features, similarity, scale,
                                                  exclude=self_index, q_labels=lab, k_labels=lab)
    has_pos = pos_count > 0
    loss = row_lse[0] - pos_sum / pos_count.clamp(min=1)
    return run.reduce(loss, reduction, keep=has_pos)


def multi_positive_info_nce(query, keys, positive_index, queue=None, *, temperature, similarity,
                            reduction, backend, group, group_strategy="gather"):
    meta = _common_meta(_Meta("multi_positive_info_nce"), query, similarity, reduction,
                        group_strategy)
    meta.add("query", query.shape[0], "rows")
    meta.add("keys", keys.shape[0], "rows")
    meta.add("positive_index columns", positive_index.shape[1])
    meta.add("query requires grad", query.requires_grad, "flag")
    meta.add("keys requires grad", keys.requires_grad, "flag")
    meta.add("queue rows", None if queue is None else queue.shape[0])
    meta.add("queue requires grad", queue is not None and queue.requires_grad, "flag")
    _scalar_meta(meta, "temperature", temperature)
    run = _Setup(group, meta, group_strategy, backend, query.device)

    scale = losses._temperature_and_scale(temperature, query)[1]
    rows = losses.row_side(query, similarity, scale)
    n_keys = run.world * keys.shape[0]
    valid = positive_index >= 0
    in_keys = valid & (positive_index < n_keys)
    key_pairs = torch.where(in_keys, positive_index, torch.full_like(positive_index, -1))
    row_lse, _, _, _, key_logits = run.stats(query, rows, keys, similarity, scale, pairs=key_pairs)
    parts = [row_lse[0]]
    l_pos = key_logits
    if queue is not None and queue.shape[0] > 0:
        cols = losses.col_side(queue, similarity, scale)
        parts.append(run.ops.lse_stats(query, queue, rows.scale, cols.scale, rows.bias, cols.bias,
                                       gammas=(1.0,))[0][0])
        in_queue = valid & ~in_keys
        qidx = (positive_index - n_keys).clamp(min=0, max=queue.shape[0] - 1)
        queue_logits = losses.paired_logits(query, rows, queue[qidx], similarity, scale)
        l_pos = torch.where(in_queue, queue_logits, l_pos)
    lse = losses._logsumexp_rows(parts)
    n_pos = valid.sum(1)
    loss = lse - torch.where(valid, l_pos, torch.zeros_like(l_pos)).sum(1) / n_pos.clamp(min=1)
    return run.reduce(loss, reduction, keep=n_pos > 0)
