"""group= (contrastive_kernels.distributed): multi-process runs on the CPU with gloo.

Every rank process (tests/_dist_worker.py, started as a subprocess with this worktree on
PYTHONPATH, joined through a file store: no ports) computes its local loss and the gradients of
its inputs; this process computes the loss of the whole batch with the fp64 reference, and:

- values: the mean of the ranks' losses is the whole-batch loss ("mean"), their sum is the
  whole-batch sum ("sum"), their outputs are the whole-batch rows ("none");
- gradients: each rank's gradient of its own shard is that of the sum of all ranks' losses, i.e.
  W x the whole-batch gradient under "mean" (DDP divides by W); replicated inputs (temperature,
  logit_scale, a queue that requires grad) summed over the ranks give the same;

for both strategies, every loss and option, every similarity, the reference and chunked backends
(and one case per loss for every other available backend), at world sizes 1, 2 and 4. Scenarios
check that bad calls raise on every rank instead of hanging (each run bounded by a timeout),
MoCoQueue's consistency across ranks, and DDP steps against one process on the whole batch.
All cases of one world size run in one set of processes, so the file takes a few tens of seconds.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import _dist_cases as dc
import contrastive_kernels as ck
from conftest import FUSED_BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMS = ["dot", "cosine", "l2"]
STRATEGIES = ["gather", "ring"]
BACKENDS = ["reference", "chunked"]
OTHER_BACKENDS = [b for b in FUSED_BACKENDS if b not in BACKENDS]
TIMEOUT = {1: 120, 2: 240, 4: 360}  # seconds for all the cases of one world size


def _case(loss, variant="", **kw):
    c = dict(loss=loss, variant=variant, similarity="cosine", strategy="gather",
             backend="chunked", reduction="mean", seed=1, B=3, dtype="float64")
    c.update(kw)
    if loss not in ("info_nce", "nt_xent"):
        c.pop("estimator", None)  # DCL/HCL: only info_nce and nt_xent have it
    return c


def _grid(**axes):
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


_SECOND_LOSSES = [("info_nce", "queue_grad+extra", "dcl+hcl"), ("nt_xent", "", "hcl"),
                  ("clip_loss", "", "ce"), ("sup_con", "multi-hot", "ce"),
                  ("multi_positive", "queue_grad", "ce")]
SECOND_ORDER = [_case(loss, variant, estimator=est, backend="reference", second=True,
                      similarity=sim)
                for (loss, variant, est), sim in zip(_SECOND_LOSSES, SIMS + SIMS)]
# the ring, and the fused backends under either strategy, have first derivatives only: a second
# backward raises the same clear error on every rank (and no rank hangs in a collective)
SECOND_ORDER_REFUSED = [
    (_case("info_nce", "queue_grad+extra", backend="reference", strategy="ring", second=True),
     "group_strategy='ring' has first derivatives only"),
    (_case("clip_loss", backend="reference", strategy="ring", second=True),
     "use group_strategy='gather' with backend='reference' for second derivatives"),
    (_case("info_nce", "queue_grad+extra", second=True), "has first derivatives only"),
    (_case("clip_loss", second=True), "use backend='reference' for second derivatives"),
]


def _world2_cases():
    cases = []
    for g in _grid(variant=["in_batch", "queue", "queue_grad", "queue+in_batch"],
                   estimator=list(dc.ESTIMATORS), similarity=SIMS, strategy=STRATEGIES,
                   backend=BACKENDS):
        cases.append(_case("info_nce", **g))
    for g in _grid(reduction=["mean", "sum", "none"], estimator=["ce", "dcl+hcl"],
                   strategy=STRATEGIES, backend=BACKENDS):
        cases.append(_case("info_nce", "queue_grad+extra", **g))
    for g in _grid(estimator=["ce", "dcl"], strategy=STRATEGIES, backend=BACKENDS):
        cases.append(_case("info_nce", "mixing", similarity="dot", K=17, **g))
    for g in _grid(estimator=list(dc.ESTIMATORS), similarity=SIMS, strategy=STRATEGIES,
                   backend=BACKENDS):
        cases.append(_case("nt_xent", **g))
    for g in _grid(reduction=["sum", "none"], strategy=STRATEGIES, backend=BACKENDS):
        cases.append(_case("nt_xent", estimator="dcl+hcl", **g))
    for g in _grid(reduction=["mean", "sum", "none"], similarity=SIMS, strategy=STRATEGIES,
                   backend=BACKENDS):
        cases.append(_case("clip_loss", **g))
    for g in _grid(variant=["int", "multi-hot"], similarity=SIMS, strategy=STRATEGIES,
                   backend=BACKENDS):
        cases.append(_case("sup_con", **g))
    for g in _grid(reduction=["sum", "none"], variant=["int", "multi-hot"], strategy=STRATEGIES,
                   backend=BACKENDS):
        cases.append(_case("sup_con", **g))
    for g in _grid(variant=["keys", "queue", "queue_grad"], similarity=SIMS, strategy=STRATEGIES,
                   backend=BACKENDS):
        cases.append(_case("multi_positive", **g))
    for g in _grid(reduction=["sum", "none"], strategy=STRATEGIES, backend=BACKENDS):
        cases.append(_case("multi_positive", "queue_grad", **g))
    # low precision (DESIGN's tolerance: at most twice the eager error in that dtype), and one
    # row per rank
    for loss, variant in [("info_nce", "queue_grad+extra"), ("nt_xent", ""), ("clip_loss", ""),
                          ("sup_con", "multi-hot"), ("multi_positive", "queue")]:
        for s in STRATEGIES:
            for dtype in ["float32", "bfloat16", "float16"]:
                cases.append(_case(loss, variant, strategy=s, dtype=dtype, estimator="dcl",
                                   similarity="l2" if dtype == "float32" else "cosine", B=5))
            cases.append(_case(loss, variant, strategy=s, B=1, similarity="dot"))
    # second derivatives (a penalty on the gradients): through the gather strategy on the
    # reference backend, for every loss (CLIP: the merge of the texts' column LSE)
    cases += SECOND_ORDER + [c for c, _ in SECOND_ORDER_REFUSED]
    # every other available backend: one case per loss and strategy
    for backend in OTHER_BACKENDS:
        for loss, variant in [("info_nce", "queue+in_batch"), ("nt_xent", ""), ("clip_loss", ""),
                              ("sup_con", "int"), ("multi_positive", "queue")]:
            for s in STRATEGIES:
                cases.append(_case(loss, variant, strategy=s, backend=backend, dtype="float32",
                                   estimator="dcl"))
    return cases


def _world4_cases():
    cases = list(SECOND_ORDER)
    for g in _grid(similarity=SIMS, strategy=STRATEGIES, backend=BACKENDS):
        cases.append(_case("info_nce", "queue_grad+extra", estimator="dcl+hcl", **g))
        cases.append(_case("info_nce", "in_batch", estimator="ce", **g))
        cases.append(_case("nt_xent", estimator="hcl", **g))
        cases.append(_case("clip_loss", **g))
        cases.append(_case("sup_con", "multi-hot", **g))
        cases.append(_case("multi_positive", "queue_grad", **g))
    for s in STRATEGIES:
        cases.append(_case("sup_con", "int", strategy=s, reduction="none", B=2))
        cases.append(_case("nt_xent", strategy=s, reduction="none", B=2))
    return cases


def _world1_cases():
    return [_case(loss, variant, strategy=s)
            for loss, variant in [("info_nce", "queue+in_batch"), ("nt_xent", ""),
                                  ("clip_loss", ""), ("sup_con", "int"),
                                  ("multi_positive", "queue")]
            for s in STRATEGIES]


CASES = {1: _world1_cases(), 2: _world2_cases(), 4: _world4_cases()}


def launch(world, job, tmp_path, timeout):
    """Run ``world`` rank processes on ``job``; return their result dicts (fails on a hang)."""
    job = dict(job, world=world, init=f"file://{tmp_path}/store", out=str(tmp_path),
               triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_dist_worker.py"),
                               str(path), str(r)], cwd=ROOT, env=env, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(world)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pytest.fail(f"world {world}: the ranks did not finish within {timeout} s (a hang?)")
    finally:
        for f in logs:
            f.close()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            tail = (tmp_path / f"rank{r}.log").read_text()[-3000:]
            pytest.fail(f"world {world}: rank {r} exited with {p.returncode}:\n{tail}")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


_results = {}


def results(world, tmp_path_factory):
    if world not in _results:
        tmp = tmp_path_factory.mktemp(f"world{world}")
        _results[world] = launch(world, {"mode": "cases", "cases": CASES[world]}, tmp,
                                 TIMEOUT[world])
    return _results[world]


def _whole(c, world, dtype, backend="reference"):
    """The whole-batch loss and gradients of case ``c`` in one process (the reference)."""
    tensors, sharding, grads = dc.build(c, world)
    local = {}
    for name, x in tensors.items():
        y = x.clone()
        if y.is_floating_point() and name not in ("temperature", "logit_scale"):
            y = y.to(dtype)
        if name in grads:
            y.requires_grad_(True)
        local[name] = y
    out = dc.call(dict(c, backend=backend, strategy="gather"), local, world=world)
    scalar = out if out.dim() == 0 else (out * dc.weights(c, world).to(out.dtype)).sum()
    inputs = [local[n] for n in grads]
    gs = torch.autograd.grad(scalar, inputs, allow_unused=True, create_graph=c.get("second", False))
    gs = [torch.zeros_like(local[n]) if g is None else g for n, g in zip(grads, gs)]
    if c.get("second"):
        gs = dc.second_derivatives(gs, inputs, [sharding[n] for n in grads])
    return [out.detach().double()] + [g.detach().double() for g in gs], sharding, grads


def check_case(c, world, ranks):
    for r, got in enumerate(ranks):
        assert not isinstance(got, str), f"rank {r} raised:\n{got}"
    truth, sharding, grads = _whole(c, world, torch.float64)
    factor = world if c["reduction"] == "mean" else 1
    if c.get("second"):  # the penalty of the gradients (dc.second_derivatives) is quadratic in them
        factor = factor ** 2
    if c["reduction"] == "mean":
        value = sum(r[0] for r in ranks) / world
    elif c["reduction"] == "sum":
        value = sum(r[0] for r in ranks)
    else:
        value = torch.zeros(dc.n_outputs(c, world), dtype=torch.float64)
        for r, pos in enumerate(dc.output_positions(c, world, c["B"])):
            value[pos] = ranks[r][0]
    combined = [value]
    for i, name in enumerate(grads):
        parts = [r[1 + i] for r in ranks]
        combined.append((torch.cat(parts) if sharding[name] == "rows" else sum(parts)) / factor)
    names = ["value"] + [f"d/d{n}" for n in grads]
    if c["dtype"] == "float64":
        for name, g, t in zip(names, combined, truth):
            scale = 1.0 + t.abs().max().item()
            err = (g - t).abs().max().item()
            assert err <= 1e-9 * scale, f"{name}: error {err:.3g} (scale {scale:.3g})"
        return
    # DESIGN's policy, with group= held to the same backend in one process as well: at most
    # twice the error of the eager reference or of the backend on the whole batch, in that dtype
    dtype = getattr(torch, c["dtype"])
    eager = _whole(c, world, dtype)[0]
    single = _whole(c, world, dtype, c["backend"])[0]
    for name, g, e, o, t in zip(names, combined, eager, single, truth):
        scale = 1.0 + t.abs().max().item()
        err = (g - t).abs().max().item()
        err_ref = max((e - t).abs().max().item(), (o - t).abs().max().item())
        assert err <= 2 * err_ref + 1e-5 * scale, (
            f"{name}: error {err:.3g} vs twice the single-process error {err_ref:.3g} + floor")


@pytest.mark.parametrize("c", [c for c in CASES[2] if c not in [r for r, _ in SECOND_ORDER_REFUSED]],
                         ids=dc.case_id)
def test_world2(c, tmp_path_factory):
    check_case(c, 2, [r[dc.case_id(c)] for r in results(2, tmp_path_factory)])


@pytest.mark.parametrize("c, message", SECOND_ORDER_REFUSED,
                         ids=[dc.case_id(c) for c, _ in SECOND_ORDER_REFUSED])
def test_second_derivatives_refused_on_every_rank(c, message, tmp_path_factory):
    for r, got in enumerate(results(2, tmp_path_factory)):
        got = got[dc.case_id(c)]
        assert isinstance(got, str), f"rank {r} returned a result"
        assert "RuntimeError" in got and message in got, (r, got[-800:])


@pytest.mark.parametrize("c", CASES[4], ids=dc.case_id)
def test_world4(c, tmp_path_factory):
    check_case(c, 4, [r[dc.case_id(c)] for r in results(4, tmp_path_factory)])


@pytest.mark.parametrize("c", CASES[1], ids=dc.case_id)
def test_world1(c, tmp_path_factory):
    check_case(c, 1, [r[dc.case_id(c)] for r in results(1, tmp_path_factory)])


def test_case_ids_are_unique():
    for cases in CASES.values():
        ids = [dc.case_id(c) for c in cases]
        assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------------------------
# scenarios: errors on every rank, MoCoQueue, DDP
# --------------------------------------------------------------------------------------------

ERRORS = {  # scenario: (exception type on the ranks that did not fail locally, message parts)
    "mismatch_dim": ("ValueError", ["feature dimension differs", "8 on rank 0", "7 on rank 1"]),
    "mismatch_dtype": ("ValueError", ["dtype differs", "float32 on rank 0"]),
    "uneven_rows": ("ValueError", ["uneven local batch sizes are not supported", "features",
                                   "4 on rank 0"]),
    "uneven_keys": ("ValueError", ["uneven local batch sizes", "keys"]),
    "local_failure": ("ValueError", ["rank 1 rejected its arguments", "temperature"]),
    "local_failure_shape": ("ValueError", ["rank 0 rejected its arguments", "positive_key"]),
    "different_options": ("ValueError", ["similarity differs", "'cosine' on rank 0"]),
    "different_strategies": ("ValueError", ["group_strategy differs"]),
    "different_functions": ("ValueError", ["called different functions", "rank 0: nt_xent"]),
    "requires_grad_mismatch": ("ValueError", ["query requires grad differs"]),
    "label_width_mismatch": ("ValueError", ["multi-hot columns) differs"]),
    "bad_group_type": ("TypeError", ["ProcessGroup"]),
    "nt_xent_mixing": ("ValueError", ["mixing is not supported with group="]),
    "moco_bad_keys": ("ValueError", ["rank 0 rejected its arguments", "keys must be (n, 6)"]),
    "moco_dtype_mismatch": ("ValueError", ["keys dtype differs"]),
}
LOCAL_FAILURES = {"local_failure": 1, "local_failure_shape": 0, "moco_bad_keys": 0}
WORKING = ["after_errors_still_in_sync", "traffic", "deepcopy_keeps_the_group", "moco_queue", "ddp_info_nce_gather", "ddp_info_nce_ring",
           "ddp_clip_ring", "ddp_clip_gather", "ddp_nt_xent_ring"]

_scenario_results = {}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def scenarios(request, tmp_path_factory):
    world = request.param
    if world not in _scenario_results:
        tmp = tmp_path_factory.mktemp(f"scenarios{world}")
        names = list(ERRORS) + WORKING
        _scenario_results[world] = launch(world, {"mode": "scenarios", "scenarios": names}, tmp,
                                          TIMEOUT[world])
    return world, _scenario_results[world]


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_calls_raise_on_every_rank(scenarios, name):
    world, ranks = scenarios
    kind, parts = ERRORS[name]
    for r, res in enumerate(ranks):
        got = res[name]
        assert "error" in got, f"rank {r} did not raise: {got}"
        if LOCAL_FAILURES.get(name) == r:  # the rank whose own checks failed raises its error
            assert got["error"] in ("ValueError", "TypeError")
            continue
        assert got["error"] == kind, (r, got)
        for part in parts:
            assert part in got["message"], (r, part, got["message"])


def test_ranks_stay_in_sync_after_errors(scenarios):
    world, ranks = scenarios
    values = [res["after_errors_still_in_sync"]["value"] for res in ranks]
    assert all(v == values[0] for v in values)


def test_deepcopy_of_modules_keeps_the_group(scenarios):
    world, ranks = scenarios
    values = [res["deepcopy_keeps_the_group"]["value"] for res in ranks]
    for v in values:
        assert v[0] is True and v[1] is True
    assert all(v[2] == values[0][2] for v in values)  # same inputs on every rank


def test_moco_queue_is_identical_on_every_rank(scenarios):
    """Rank r enqueues r + 1 rows filled with 100 * step + r: the queue holds every rank's keys
    in rank order, identically on every rank, wrapping around its 7 rows."""
    world, ranks = scenarios
    steps = [res["moco_queue"]["value"] for res in ranks]
    for other in steps[1:]:
        for (ka, pa, fa), (kb, pb, fb) in zip(steps[0], other):
            assert torch.equal(ka, kb) and pa == pb and fa == fb
    torch.manual_seed(123)
    expected = ck.nn.MoCoQueue(7, 3)
    for step, (keys, ptr, filled) in enumerate(steps[0]):
        expected.enqueue(torch.cat([torch.full((r + 1, 3), float(100 * step + r))
                                    for r in range(world)]))
        assert torch.equal(keys, expected.keys) and ptr == int(expected.ptr)
        assert filled == int(expected.filled)


def test_bytes_sent_match_the_formulas(scenarios):
    """The communication volume of README's table (bench.distributed.comm_bytes) is what the
    code sends, byte for byte, for every loss, both strategies, every dtype size."""
    from contrastive_kernels.bench.distributed import comm_bytes

    world, ranks = scenarios
    for res in ranks:
        measured = res["traffic"]["value"]
        assert len(measured) == 10
        for (loss, similarity, strategy, dtype), sent in measured.items():
            itemsize = getattr(torch, dtype.replace("torch.", "")).itemsize
            rows = 6 if loss == "nt_xent" else 3
            expected = comm_bytes(loss, strategy, rows, world, 5, itemsize, similarity,
                                  label_bytes=8 if loss == "sup_con" else 0,
                                  acc_itemsize=8 if itemsize == 8 else 4)
            assert sent == expected, (loss, similarity, strategy, dtype, sent, expected)


@pytest.mark.parametrize("name", [n for n in WORKING if n.startswith("ddp_")])
def test_ddp_follows_the_whole_batch(scenarios, name):
    """Two SGD steps of DDP(encoder + loss with group=) end at the parameters (encoder,
    learnable temperature / logit scale) of the same steps on the whole batch in one process."""
    world, ranks = scenarios
    for r, res in enumerate(ranks):
        assert "value" in res[name], (r, res[name])
        assert res[name]["value"] < 1e-5, (r, res[name]["value"])


# --------------------------------------------------------------------------------------------
# in this process (no process group)
# --------------------------------------------------------------------------------------------


def test_group_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("another test left a process group initialized in this process")
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="init_process_group"):
        ck.info_nce(q, q, group=object())
    with pytest.raises(ValueError, match="init_process_group"):
        ck.nn.ClipLoss(group=object())(q, q)


@pytest.mark.parametrize("fn", ["info_nce", "nt_xent", "clip_loss", "sup_con", "multi_positive"])
def test_group_strategy_is_checked(fn):
    q = torch.randn(3, 4)
    calls = {
        "info_nce": lambda s: ck.info_nce(q, q, group_strategy=s),
        "nt_xent": lambda s: ck.nt_xent(q, q, group_strategy=s),
        "clip_loss": lambda s: ck.clip_loss(q, q, 10.0, group_strategy=s),
        "sup_con": lambda s: ck.sup_con(q, torch.arange(3), group_strategy=s),
        "multi_positive": lambda s: ck.multi_positive_info_nce(
            q, q, torch.zeros(3, 1, dtype=torch.long), group_strategy=s),
    }
    for ok in ("gather", "ring"):  # without a group the strategy changes nothing
        assert torch.isfinite(calls[fn](ok))
    with pytest.raises(ValueError, match="group_strategy must be one of 'gather', 'ring'"):
        calls[fn]("tree")


def test_modules_forward_group_strategy():
    q = torch.randn(3, 4)
    for module in (ck.nn.InfoNCELoss(group_strategy="ring"),
                   ck.nn.NTXentLoss(group_strategy="ring"), ck.nn.ClipLoss(group_strategy="ring")):
        assert module.group_strategy == "ring"
        module(q, q)
    assert ck.nn.SupConLoss(group_strategy="ring")(q, torch.arange(3)).isfinite()
    with pytest.raises(ValueError, match="group_strategy"):
        ck.nn.InfoNCELoss(group_strategy="all")(q, q)


@pytest.mark.slow
def test_ring_memory_does_not_grow_with_the_world():
    """Fixed local batch, growing world: the ring's extra peak memory per rank stays flat (two
    shards and one partial key gradient in hand), the gather strategy's grows with the global
    batch (the gathered keys and their gradient). Measured as bench.distributed does."""
    from contrastive_kernels.bench.distributed import run_config

    peak = {}
    for strategy in STRATEGIES:
        for world in (2, 4):
            spec = {"loss": "info_nce", "strategy": strategy, "world": world, "N": 512 * world,
                    "D": 512, "dtype": "fp32", "backend": "chunked", "repeats": 0, "threads": 1,
                    "chunk_mb": 4}
            res = run_config(spec, timeout=300)
            assert "ranks" in res, res
            peak[strategy, world] = max(r["peak_extra_bytes"] for r in res["ranks"])
    shard = 512 * 512 * 4
    assert peak["ring", 4] <= peak["ring", 2] + 2 * shard, peak
    assert peak["gather", 4] >= peak["gather", 2] + 4 * shard, peak
