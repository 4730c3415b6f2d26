"""DDP training with contrastive_kernels' group= losses (CPU, gloo; runs on GPUs with nccl too).

    torchrun --standalone --nproc_per_node 2 examples/ddp_infonce.py
    torchrun --standalone --nproc_per_node 4 examples/ddp_infonce.py --loss clip --strategy ring

A tiny encoder learns to map two noisy views of the same point of a Gaussian mixture close
together. Each rank holds its own shard of every batch (DistributedSampler, drop_last=True: the
losses reject uneven local batches); the loss contrasts the rank's rows with the keys of *all*
ranks and returns the rank's local loss, and its backward sends every key's gradient back to the
rank that owns it. DDP averages the gradients, so training follows the loss of the whole global
batch, exactly as one process holding all of it would (``--check`` verifies this on the first
step). The loss module sits inside the DDP model, so that a learnable logit scale / temperature is
averaged like the encoder's parameters.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import contrastive_kernels as ck


class Model(nn.Module):
    """Encoder + loss: one forward per step (DDP expects that), returning the local loss."""

    def __init__(self, loss: nn.Module, dim_in=16, dim_out=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim_in, 64), nn.ReLU(), nn.Linear(64, dim_out))
        self.loss = loss

    def forward(self, view1, view2):
        z = self.encoder(torch.cat([view1, view2]))
        return self.loss(z[:view1.shape[0]], z[view1.shape[0]:])


def make_loss(name, group, strategy):
    if name == "info_nce":  # in-batch negatives: the positive keys of every rank
        return ck.nn.InfoNCELoss(0.2, similarity="cosine", group=group, group_strategy=strategy)
    if name == "nt_xent":  # each view against the 2N - 2 other views of the global batch
        return ck.nn.NTXentLoss(0.3, group=group, group_strategy=strategy)
    if name == "clip":  # a learnable logit scale (kept as its log), averaged by DDP
        return ck.nn.ClipLoss(10.0, similarity="cosine", group=group, group_strategy=strategy)
    raise ValueError(name)


def dataset(n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(32, dim, generator=g) * 3
    points = centers[torch.randint(0, 32, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    view1 = points + 0.3 * torch.randn(n, dim, generator=g)
    view2 = points + 0.3 * torch.randn(n, dim, generator=g)
    return TensorDataset(view1, view2)


def check_first_step(model, loader, args):
    """The DDP step equals one process's step on the whole global batch (every rank checks)."""
    whole = copy.deepcopy(model.module)
    whole.loss.group = None  # the same model without group=: one process, the whole batch
    view1, view2 = next(iter(loader))
    rows = [torch.empty_like(view1) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, view1.contiguous())
    all1 = torch.cat(rows)
    dist.all_gather(rows, view2.contiguous())
    all2 = torch.cat(rows)
    model.zero_grad()
    model(view1, view2).backward()  # DDP: gradients averaged over the ranks
    whole.zero_grad()
    whole(all1, all2).backward()
    err = max(float((a.grad - b.grad).abs().max())
              for a, b in zip(model.module.parameters(), whole.parameters()))
    print(f"[rank {dist.get_rank()}] --check: DDP gradient vs whole-batch gradient: max |diff| "
          f"{err:.2e}", flush=True)
    model.zero_grad()
    return err


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="info_nce", choices=["info_nce", "nt_xent", "clip"])
    p.add_argument("--strategy", default="gather", choices=["gather", "ring"],
                   help="gather: all-gather the keys (fast, memory O(global batch)); ring: pass "
                        "them around (memory O(local batch))")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--check", action="store_true", help="verify the first step against one "
                   "process on the whole batch")
    args = p.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun provides RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank (DDP broadcasts rank 0's anyway)
    model = Model(make_loss(args.loss, dist.group.WORLD, args.strategy)).to(device)
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = dataset(4096, 16)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0,
                                 drop_last=True)
    loader = DataLoader(data, batch_size=args.global_batch // world, sampler=sampler,
                        drop_last=True)  # equal local batches on every rank
    if args.check:
        check_first_step(model, loader, args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, steps = torch.zeros((), device=device), 0
        for view1, view2 in loader:
            loss = model(view1.to(device), view2.to(device))  # this rank's local loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        dist.all_reduce(total)  # the mean of the ranks' losses is the whole-batch loss
        if rank == 0:
            print(f"epoch {epoch}: whole-batch {args.loss} loss {float(total) / world / steps:.4f} "
                  f"({world} ranks x {args.global_batch // world} rows, strategy {args.strategy})",
                  flush=True)
    # release DDP (its reducer holds the process group) before the group: with torchrun + gloo,
    # torch 2.13 otherwise aborts at exit now and then ("terminate called without an active
    # exception"), with or without contrastive_kernels
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
