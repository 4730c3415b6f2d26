"""A bank in chunks, for the top-k backends that search a bank chunk by chunk and merge a running
top-k (triton/topk.py, _csrc_backend.py): views of a bank already on the query's device, or a bank
on the host streamed to the device.

Host banks go through two pinned staging buffers and two device buffers; the host-to-device copies
run on a side stream and events order them against the kernels: a device buffer is refilled only
after the kernels that read it finished, a staging buffer only after its copy finished. So chunk
c+1 crosses PCIe while chunk c is searched and the CPU stages chunk c+2. A pinned bank
(``bank.pin_memory()``) is copied directly, without staging. Chunks are
``CK_TOPK_HOST_CHUNK_MB`` (default 256 MiB) of bank rows."""
from __future__ import annotations

import os
from typing import List, Tuple

import torch

HOST_CHUNK_BYTES = int(float(os.environ.get("CK_TOPK_HOST_CHUNK_MB", "256")) * 2**20)
# The top-k kernels' per-query-row candidate memory budget (Triton's candidate slots, the CPU
# kernel's key buffers): query rows are processed in blocks that stay under it.
TOPK_BUFFER_BYTES = int(float(os.environ.get("CK_TOPK_BUFFER_MB", "512")) * 2**20)


def host_chunk_rows(bank) -> int:
    """Rows per chunk of a streamed host bank: HOST_CHUNK_BYTES of them, at least one."""
    return max(1, HOST_CHUNK_BYTES // max(1, bank.element_size() * bank.shape[1]))


def plan_chunks(n: int, chunk_rows: int, slots: int = 2) -> List[Tuple[int, int, int]]:
    """(first row, end row, buffer slot) of each chunk of a streamed bank, in order."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [(j0, min(n, j0 + chunk_rows), c % slots)
            for c, j0 in enumerate(range(0, n, chunk_rows))]


class DeviceChunks:
    """A bank already on the query's device, in chunks (views, no copies)."""

    def __init__(self, bank, labels, chunk_rows):
        self.bank, self.labels, self.chunk_rows = bank, labels, chunk_rows

    def __iter__(self):
        for j0, j1, _ in plan_chunks(self.bank.shape[0], self.chunk_rows):
            yield j0, self.bank[j0:j1], None if self.labels is None else self.labels[j0:j1]

    def consumed(self):
        pass


class HostChunks:
    """A host bank streamed to the device: pinned staging + device double buffers, copies on a
    side stream. Iterating yields (first row, device chunk, device labels); the consumer calls
    ``consumed()`` after enqueueing the kernels that read the chunk. ``runtime`` is the CUDA
    API used (``torch.cuda``; a stand-in in the CPU tests of the scheduling)."""

    def __init__(self, bank, labels, chunk_rows, device, runtime=None):
        self.rt = runtime if runtime is not None else torch.cuda
        self.bank, self.labels, self.chunk_rows, self.device = bank, labels, chunk_rows, device
        rows = min(chunk_rows, bank.shape[0])
        self.pinned = bool(getattr(bank, "is_pinned", lambda: False)())
        self.dev = [torch.empty((rows, bank.shape[1]), dtype=bank.dtype, device=device) for _ in range(2)]
        self.dev_labels = ([torch.empty(rows, dtype=torch.int64, device=device) for _ in range(2)]
                           if labels is not None else None)
        self.staging = (None if self.pinned else
                        [torch.empty((rows, bank.shape[1]), dtype=bank.dtype,
                                     pin_memory=self.rt.is_available()) for _ in range(2)])
        self.copy_stream = self.rt.Stream(device)
        self.copied = [self.rt.Event() for _ in range(2)]     # H2D of slot done (side stream)
        self.released = [self.rt.Event() for _ in range(2)]   # kernels reading slot done (main)
        self.copy_recorded = [False, False]
        self._slot = None

    def __iter__(self):
        for j0, j1, slot in plan_chunks(self.bank.shape[0], self.chunk_rows):
            n = j1 - j0
            if self.pinned:
                src = self.bank[j0:j1]
            else:
                if self.copy_recorded[slot]:
                    self.copied[slot].synchronize()  # the staging buffer's last copy is done
                src = self.staging[slot][:n]
                src.copy_(self.bank[j0:j1])          # CPU memcpy, overlaps the GPU's work
            main = self.rt.current_stream(self.device)
            with self.rt.stream(self.copy_stream):
                self.copy_stream.wait_event(self.released[slot])  # no kernel still reads it
                self.dev[slot][:n].copy_(src, non_blocking=True)
                if self.labels is not None:
                    self.dev_labels[slot][:n].copy_(self.labels[j0:j1], non_blocking=True)
                self.copied[slot].record(self.copy_stream)
            self.copy_recorded[slot] = True
            main.wait_event(self.copied[slot])
            self._slot = slot
            yield j0, self.dev[slot][:n], None if self.labels is None else self.dev_labels[slot][:n]

    def consumed(self):
        self.released[self._slot].record(self.rt.current_stream(self.device))
