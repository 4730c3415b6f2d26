"""One rank of test_distributed.py: ``python tests/_dist_worker.py JOB.json RANK``.

JOB.json: {"world": W, "init": "file:///...", "mode": "cases" | "scenarios", "cases": [...],
"out": folder}. Writes OUT/rank{RANK}.pt: for "cases", {case_id: [value, *grads] (a case with
"second": the gradients of _dist_cases.second_derivatives instead) or an error string}; for
"scenarios", {name: result}. Runs with the worktree on PYTHONPATH (set by the test)."""
from __future__ import annotations

import json
import os
import sys
import traceback

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def run_case(c, rank, world, group):
    import _dist_cases as dc

    tensors, sharding, grads = dc.build(c, world)
    dtype = DTYPES[c.get("dtype", "float64")]
    local = {}
    for name, x in tensors.items():
        y = dc.shard(x, sharding[name], rank, world).clone()
        if y.is_floating_point():
            y = y.to(dtype) if name not in ("temperature", "logit_scale") else y
            if name in grads:
                y.requires_grad_(True)
        local[name] = y
    out = dc.call(c, local, group=group, rank=rank, world=world)
    if out.dim() == 0:
        scalar = out
    else:
        w = dc.weights(c, world)[dc.output_positions(c, world, c["B"])[rank]]
        scalar = (out * w.to(out.dtype)).sum()
    inputs = [local[n] for n in grads]
    gs = torch.autograd.grad(scalar, inputs, allow_unused=True, create_graph=c.get("second", False))
    gs = [torch.zeros_like(local[n]) if g is None else g for n, g in zip(grads, gs)]
    if c.get("second"):
        gs = dc.second_derivatives(gs, inputs, [sharding[n] for n in grads])
    return [out.detach().double()] + [g.detach().double() for g in gs]


def main():
    job = json.load(open(sys.argv[1]))
    rank, world = int(sys.argv[2]), job["world"]
    if job.get("triton_interpret"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=job["init"], rank=rank, world_size=world)
    group = dist.group.WORLD
    results = {}
    if job["mode"] == "cases":
        import _dist_cases as dc

        for c in job["cases"]:
            try:
                results[dc.case_id(c)] = run_case(c, rank, world, group)
            except Exception:  # recorded; the test of that case fails with it
                results[dc.case_id(c)] = traceback.format_exc(limit=6)
    else:
        import _dist_scenarios

        results = _dist_scenarios.run(job["scenarios"], rank, world, group)
    torch.save(results, os.path.join(job["out"], f"rank{rank}.pt"))
    # every rank done before any tears gloo down: a rank destroying the group while another still
    # has gloo work in flight (the error scenarios end unevenly) aborts it ("terminate called")
    dist.barrier(group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
