"""Atomic files and the random state of a run.

A checkpoint is written to a temporary file in the destination's directory, flushed and
fsync'ed, then ``os.replace``d over the destination (and the directory fsync'ed): a run killed at
any moment leaves either the previous checkpoint or the new one, never a torn file. metrics.json
and the PNGs are written the same way.
"""
from __future__ import annotations

import glob
import io
import json
import os
import random
import tempfile
from typing import Dict

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj, path: str) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def remove_stale_temporaries(directory: str) -> int:
    """Temporary files left by a run killed while writing; returns how many were removed."""
    removed = 0
    for path in glob.glob(os.path.join(directory, _TMP_PREFIX + "*")):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def load_checkpoint(path: str) -> Dict:
    # our own file: it holds numpy/python RNG states, which weights_only loading refuses
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# random state
# --------------------------------------------------------------------------------------------

def derive_seed(seed: int, stream: str, rank: int = 0) -> int:
    """A seed per named random stream (and rank), stable across runs and Python versions."""
    h = 1469598103934665603
    for byte in f"{seed}/{stream}/{rank}".encode():
        h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def make_generators(seed: int, rank: int) -> Dict[str, torch.Generator]:
    """The run's CPU generators: augmentation draws differ per rank (each rank augments its own
    shard); the mixing and method draws are shared so that every rank makes the same choices."""
    return {
        "augment": torch.Generator().manual_seed(derive_seed(seed, "augment", rank)),
        "mixing": torch.Generator().manual_seed(derive_seed(seed, "mixing", rank)),
        "method": torch.Generator().manual_seed(derive_seed(seed, "method")),
    }


def capture_rng(generators: Dict[str, torch.Generator]) -> Dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict, generators: Dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
