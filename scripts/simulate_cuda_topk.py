"""How often the CUDA top-k kernel (csrc/cuda/topk_kernels.cuh) leaves its fast path: a host
simulation of one warp's selection (16 query rows) over one column split of random unit vectors,
with the kernel's tile (64 bank rows), candidate buffer (64 keys per row) and thresholds (the
row's k-th score once k are known). It counts the tiles that take the slow path (some score of
the warp's 16 x 64 passes), the survivors per row and the merges per row, the inputs of the cost
model in the kernel's header and README.md's Limits, and checks that the simulated queues end as
the exact top-k.

    python scripts/simulate_cuda_topk.py --k 256 --n 524288
"""
from __future__ import annotations

import argparse

import torch

TILE, CAP, ROWS = 64, 64, 16


def simulate(k: int, n: int, d: int = 128, seed: int = 0, chunk: int = 1 << 16):
    """Returns (stats dict, queues, scores or None): the queues are each row's top-k values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(ROWS, d, generator=g), dim=1)
    thr = torch.full((ROWS,), float("nan"))
    queues = [torch.empty(0) for _ in range(ROWS)]
    buffers = [[] for _ in range(ROWS)]
    slow = survivors = merges = 0
    kept = [] if n <= (1 << 16) else None  # the scores, to check small runs

    def merge(r):
        nonlocal merges
        merges += 1
        queues[r] = torch.cat([queues[r], torch.tensor(buffers[r])]).sort(descending=True).values[:k]
        buffers[r].clear()
        if queues[r].numel() >= k:
            thr[r] = queues[r][k - 1]

    for c0 in range(0, n, chunk):
        bank = torch.nn.functional.normalize(torch.randn(min(chunk, n - c0), d, generator=g), dim=1)
        scores = q @ bank.T
        if kept is not None:
            kept.append(scores)
        for t0 in range(0, scores.shape[1], TILE):
            tile = scores[:, t0:t0 + TILE]
            passing = ~(tile <= thr[:, None])
            if not passing.any():
                continue
            slow += 1
            for r in passing.any(1).nonzero().flatten().tolist():
                for v in tile[r][passing[r]].tolist():
                    if v <= thr[r]:  # the row merged earlier in this tile: its new threshold
                        continue
                    survivors += 1
                    buffers[r].append(v)
                    if len(buffers[r]) == CAP:
                        merge(r)
    for r in range(ROWS):
        if buffers[r]:
            merge(r)
    tiles = -(-n // TILE)
    stats = {"tiles": tiles, "slow_tiles": slow, "slow_fraction": slow / tiles,
             "survivors_per_row": survivors / ROWS, "merges_per_row": merges / ROWS}
    return stats, queues, (torch.cat(kept, dim=1) if kept is not None else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--n", type=int, default=1 << 19, help="columns of the split (default 2^19)")
    args = ap.parse_args(argv)
    for k in args.k:
        s, _, _ = simulate(k, args.n)
        print(f"k={k} n={args.n}: slow path in {s['slow_tiles']} of {s['tiles']} tiles "
              f"({100 * s['slow_fraction']:.0f} %), {s['survivors_per_row']:.0f} survivors and "
              f"{s['merges_per_row']:.1f} merges per row", flush=True)


if __name__ == "__main__":
    main()
