"""Checkpoints and the random state of a run. The checkpoint, metrics.json and the PNGs are
written atomically (contrastive_kernels._files): a run killed at any moment leaves the previous
file or the new one, never a torn file."""
from __future__ import annotations

import glob
import io
import json
import os
import random
from typing import Dict

import numpy as np
import torch

from .._files import _TMP_PREFIX, WriteError, _temporary_prefix, atomic_write_bytes  # noqa: F401 (re-exported)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# what a checkpoint holds (Trainer.save); a file without one of these is not one of ours
CHECKPOINT_KEYS = ("format", "config", "step", "losses", "init_metrics", "modules", "optimizers",
                   "method", "lockstep", "data_order", "per_rank", "world")
# the files a run writes into its --out folder (the temporaries of other files are left alone)
RUN_OUTPUTS = (CHECKPOINT_NAME, "metrics.json", "loss.png")


class CheckpointError(Exception):
    """A --resume file that is not a checkpoint of this training loop: one line naming it."""


def atomic_torch_save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj, path: str) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def remove_stale_temporaries(directory: str, names=RUN_OUTPUTS) -> int:
    """Temporary files left in ``directory`` by a run killed while writing one of ``names``;
    returns how many were removed. Other files, temporary or not, are left alone."""
    removed = 0
    paths = [p for name in names
             for p in glob.glob(os.path.join(glob.escape(directory),
                                             glob.escape(_temporary_prefix(name)) + "*"))]
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def load_checkpoint(path: str) -> Dict:
    """A checkpoint written by ``Trainer.save``; CheckpointError (one line) for anything else."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        # our own file: it holds numpy/python RNG states, which weights_only loading refuses
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load fails in many ways on a truncated or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this training loop (it holds a "
                              f"{type(state).__name__}, not a dict)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')!r}; this "
                              f"training loop reads format {CHECKPOINT_FORMAT}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: it lacks "
                              f"{', '.join(repr(k) for k in missing)}")
    return state


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
