"""Host work per training step of the Triton backend: aten ops and Triton launches.

At the MoCo shape a GPU step of the fused loss is bound by the host (README: 2.25 ms of wall time
against 0.13 ms of kernels on an H100), and every small op is a launch and a trip through the
dispatcher. These budgets pin the number of ops that do work (views and allocations aside) and of
Triton launches per forward + backward, so that a change which adds host work shows here. The
counts are taken on the CPU under the Triton interpreter (profiler events, nothing below an
interpreted launch); a CUDA step runs the same Python and so the same ops.
"""
from __future__ import annotations

import collections
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS

import contrastive_kernels as ck

# CPU tensors through the interpreter: the counts need its launch hook (a GPU runs test_gpu_*)
pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts Triton launches under the interpreter")

# ops that move no data (views, metadata, allocations) and no-op conversions
_FREE = {"aten::detach", "aten::select", "aten::slice", "aten::unsqueeze", "aten::view",
         "aten::expand", "aten::permute", "aten::t", "aten::transpose", "aten::alias",
         "aten::as_strided", "aten::_reshape_alias", "aten::reshape", "aten::squeeze",
         "aten::flatten", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
         "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::result_type",
         "aten::to", "aten::contiguous", "aten::new_empty", "aten::real", "aten::set_",
         "aten::narrow", "aten::as_strided_", "aten::squeeze_", "aten::unsqueeze_", "aten::numpy_T", "aten::mT", "aten::unflatten", "aten::split", "aten::chunk", "aten::unbind"}
_LAUNCH = "ck::triton_launch"


@contextlib.contextmanager
def _launches_marked(counter):
    """Count interpreted Triton launches and mark them in the profile (their ops are not ours)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def marked(self, *args, **kwargs):
        counter[self.fn.__name__] += 1
        with torch.profiler.record_function(_LAUNCH):
            return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = marked
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


def _leaf_ops(events):
    """The aten ops that do the work: leaves of each top-level aten op, outside Triton launches."""
    def leaves(ev):
        # an op whose only children move no data (cat: an empty) is itself the leaf doing work
        kids = [c for c in ev.cpu_children if c.name.startswith("aten::") and c.name not in _FREE]
        return [ev] if not kids else [x for c in kids for x in leaves(c)]

    ops = collections.Counter()
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::") or parent.name == _LAUNCH:
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            ops.update(leaf.name for leaf in leaves(ev) if leaf.name not in _FREE)
    return ops


def host_work(step):
    """(aten ops doing work, Triton launches) of one call of ``step``, after two warm-up calls."""
    step()
    step()
    launches = collections.Counter()
    with _launches_marked(launches):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    return _leaf_ops(prof.events()), launches


def _moco_step(mixing):
    gen = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, 32, generator=gen), dim=1).half()  # noqa: E731
    q, pos, queue = unit(32).requires_grad_(), unit(32), unit(2048)
    mix = ck.Mixing(*mixing, generator=torch.Generator().manual_seed(1)) if mixing else None

    def step():
        q.grad = None
        ck.info_nce(q, pos, queue, temperature=0.07, mixing=mix, backend="triton").backward()
    return step


# (case, mixing, most ops, Triton launches), fp16, B=32, K=2048, D=32. Measured when written: 18
# and 32 ops. History (MoCo / MoCHi): 49 / 110 at first; 44 / 86 once a float temperature was one
# fill, single-chunk row dots lost their buffers, the row merge kernel wrote the zero label sums
# and the loss kernel MoCHi's candidates as top-k keys; 35 / 56 once the custom ops stopped
# zero-filling the gradients of unused outputs, the row merge kernel flagged MoCHi's inexact rows
# (one nonzero instead of eleven ops), a gamma of 1 was no multiply and mixed_lse's backward masked
# only the bias gradient; 25 / 49 once the kernels chained the positive, the queue's and the
# synthetic log-sum-exps (before: a stack and a log-sum-exp of our own, 7 CPU ops, and 5 in
# backward); 18 / 42 once the positive's dot product was one launch each way (paired_dot), not
# 4 ops forward and 3 backward. The counter then learned to see an op whose only children are
# views or allocations (mm, cat: 18 / 44 before, 42 by the old count); 18 / 36 once the threshold
# sample's k-th score was one kthvalue (not topk and amin) lowered by the loss kernel as it loads
# it (not a cast, abs and add), the draws reached the mixing kernels as draw_mixing's views with
# their strides (not a stack and two copies), and mixed_lse's missing bias was a constexpr (not a
# zero buffer); 18 / 32 once a kernel sorted each row's candidate list and decoded the hard
# negatives (not a fill of the list buffer, a topk over it, an and and a subtraction; one more
# launch).
# "mochi-2-splits": the synthetic points of each row in two splits, as on a GPU when B is below
# twice the SM count (MoCo's B=256 on an H100), merged by one more kernel (before it, by 23 torch
# ops: 79 per step).
BUDGETS = [("moco", None, 20, 4),
           ("mochi", (64, 16, 8), 34, 6),
           ("mochi-2-splits", (64, 16, 8), 34, 7)]


@pytest.mark.parametrize("case,mixing,max_ops,n_launches", BUDGETS, ids=[b[0] for b in BUDGETS])
def test_host_ops_per_step_within_budget(case, mixing, max_ops, n_launches, monkeypatch):
    from contrastive_kernels import _loss_topk
    from contrastive_kernels.triton import mixing as triton_mixing

    if case.endswith("2-splits"):
        monkeypatch.setattr(triton_mixing, "_lse_splits", lambda b, n_blocks, device: 2)
    fused_before = _loss_topk.STATS["fused_calls"]
    ops, launches = host_work(_moco_step(mixing))
    total = sum(ops.values())
    assert total <= max_ops, f"{case}: {total} ops per step (budget {max_ops}): {dict(ops)}"
    assert sum(launches.values()) == n_launches, dict(launches)
    assert "_lse_fwd_kernel" in launches
    if mixing:  # the hard negatives came out of the loss pass (one kernel), not a separate top-k
        assert _loss_topk.STATS["fused_calls"] > fused_before
        assert "_topk_tile_kernel" not in launches and "_mixed_lse_kernel" in launches
        assert "_cand_merge_kernel" in launches
        assert ("_mixed_combine_kernel" in launches) == case.endswith("2-splits")


def test_host_work_counter_sees_added_ops():
    """The counter itself: an extra elementwise op in the step is one more op, a view none, a cat
    one."""
    base = _moco_step(None)
    extra = torch.zeros(4)

    def with_view():
        base()
        extra.view(2, 2)

    def with_op():
        with_view()
        torch.exp(extra)

    def with_cat():  # aten::cat's only children are views (narrow) and an allocation
        with_op()
        torch.cat([extra, extra])

    n_base, n_view, n_op, n_cat = (sum(host_work(step)[0].values())
                                   for step in (base, with_view, with_op, with_cat))
    assert n_view == n_base
    assert n_op == n_base + 1
    assert n_cat == n_base + 2


def _profile_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "profile_gpu_step.py"
    spec = importlib.util.spec_from_file_location("profile_gpu_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_profile_script_runs_on_cpu(capsys):
    """scripts/profile_gpu_step.py (the GPU session's host/kernel split) at its tiny CPU shape."""
    script = _profile_script()
    script.main(["--device", "cpu", "--tiny", "--steps", "1", "--graph", "--no-launch",
                 "--cprofile", "--rows", "5"])
    out = capsys.readouterr().out
    assert "case moco (B=32 K=2048 D=32 bf16" in out and "ms/step, forward" in out
    assert "graph replay: needs a CUDA device" in out
    assert "no Triton launches: wall" in out
    assert "host profile of 1 steps" in out and "Ordered by: internal time" in out


def test_no_launch_mochi_step_recomputes_no_rows():
    """With every launch skipped the MoCHi step's inexact-row flags are never written; the
    script's ``no_triton_launches`` counts every row certified, so the host work it times is a
    real step's (no fallback top-k of random rows), and it restores everything after."""
    from contrastive_kernels import _loss_topk

    script = _profile_script()
    step = _moco_step((64, 16, 8))
    step()  # launched: the fused path's first-call check passes
    real = _loss_topk.lse_stats_topk
    fused, fallback = _loss_topk.STATS["fused_calls"], _loss_topk.STATS["fallback_rows"]
    with script.no_triton_launches():
        for _ in range(3):
            step()
    assert _loss_topk.STATS["fused_calls"] == fused + 3
    assert _loss_topk.STATS["fallback_rows"] == fallback
    assert _loss_topk.lse_stats_topk is real
