"""One training run: data, method, the step loop with checkpoints, evaluation and outputs.

Determinism and resume. Every random number comes from seeded, checkpointed state: the global
torch generator (model initialization), three CPU ``torch.Generator``s (augmentation, mixing,
method choices; see ``checkpoint.make_generators``), and ``DataOrder`` (its generator, the
current permutation and the position in it). A checkpoint taken after step t holds the models,
optimizers, method state (MoCo queue, QK bank, ...), every RNG state (torch CPU/CUDA, numpy,
python ``random``, the generators), the data order, the step and the losses so far. Resuming
restores all of it and continues at step t + 1, so its loss list equals an uninterrupted run's
bit for bit on the CPU (same thread count). ``torch.use_deterministic_algorithms(True)`` is on
(on CUDA with warn_only: ops without a deterministic kernel warn instead of failing).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import training_config
from .data import DataOrder, load_copy_detection, load_digits, load_synthetic, make_multilabel
from .methods import METHODS, Context
from .report import plot_loss


class RunError(Exception):
    """A run cannot start (unavailable backend, checkpoint of another config...): one line."""


def resolved_impl(impl: str, device: torch.device) -> str:
    """The backend that ``impl`` runs the losses on (auto -> the first available one)."""
    from contrastive_kernels import functional

    ops = functional.resolve_backend(impl, "loss", device)
    if ops == "reference":
        return "reference"
    for name, module in functional.BACKEND_MODULES.items():
        if getattr(ops, "__name__", None) == module:
            return name
    return str(getattr(ops, "__name__", ops))


def check_impl(impl: str, device: str) -> None:
    import contrastive_kernels as ck

    reason = ck.available_backends(torch.device(device)).get(impl)
    if impl != "auto" and reason is not None:
        raise RunError(f"--impl {impl} is not available on {device}: {reason}")


def check_split_sizes(data, cfg) -> None:
    """Training needs images to draw batches from, evaluation held-out images to score: a
    --num-samples too small for either is refused before training (an empty training split
    would make the data order loop forever, an empty held-out one crash the evaluation)."""
    n_train, n_test = len(data.train_x), len(data.test_x)
    if n_train and n_test:
        return
    empty = "training" if not n_train else "held-out"
    held_out = "20% of the images, at least one" if data.kind == "copy" else \
        "20% of each class, rounded"
    raise RunError(f"--data {cfg.data} --num-samples {cfg.num_samples} is too small: it gives "
                   f"{n_train} training and {n_test} held-out images ({held_out}), so the "
                   f"{empty} split is empty; give a larger --num-samples")


def build_data(cfg):
    if cfg.method == "qk" and cfg.data == "synthetic":
        data = load_copy_detection(cfg.num_samples, cfg.image_size, cfg.bank_size)
        check_split_sizes(data, cfg)
        return data
    base = load_digits() if cfg.data == "digits" else load_synthetic(cfg.num_samples, cfg.image_size)
    check_split_sizes(base, cfg)
    if cfg.method == "multilabel":
        return make_multilabel(base, n_train=2 * len(base.train_x), n_test=2 * len(base.test_x))
    return base


def total_steps(cfg, n_train: int) -> int:
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    return cfg.steps


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over min(warmup, total/10) steps, then cosine decay to 0."""
    warmup = min(warmup, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

class PeakMemory:
    """CPU: peak RSS of this process over the training loop, as the benchmark harness measures
    it (reset the high-water mark through /proc/self/clear_refs, then read VmHWM); also the part
    above the RSS at the start of the loop. GPU: torch.cuda.max_memory_allocated."""

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True
        self.before = 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        from contrastive_kernels.bench.measure import proc_status, reset_peak_rss

        self.exact = reset_peak_rss()
        self.before = proc_status()["VmRSS"]

    def stop(self) -> Dict:
        mib = float(1 << 20)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            how = "torch.cuda.max_memory_allocated over the training loop"
        else:
            from contrastive_kernels.bench.measure import proc_status

            peak = proc_status()["VmHWM"]
            how = ("peak RSS (VmHWM after resetting /proc/self/clear_refs) of the training process "
                   "over the training loop" + ("" if self.exact else "; reset unavailable, so the "
                                                "peak since process start"))
        return {"peak_memory_mb": peak / mib, "peak_memory_extra_mb": (peak - self.before) / mib,
                "memory_measure": how}


# --------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------

def init_distributed(cfg):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise RunError("--distributed needs torchrun's environment (missing "
                       f"{', '.join(missing)}): torchrun --nproc-per-node N -m "
                       "contrastive_kernels.train --distributed ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if cfg.device.startswith("cuda"):
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if cfg.batch_size % world:
        raise RunError(f"--batch-size {cfg.batch_size} must be divisible by the world size {world}")
    return device, dist.group.WORLD, rank, world


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.t0 = time.perf_counter()
        self.group, self.rank, self.world = None, 0, 1
        if cfg.device.startswith("cuda"):
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if cfg.distributed:
            self.device, self.group, self.rank, self.world = init_distributed(cfg)
        else:
            self.device = torch.device(cfg.device)
        for impl in [cfg.impl, *(cfg.shadow_impl or [])]:
            check_impl(impl, str(self.device))
        if self.rank == 0:  # before the data and models are built: a bad --out fails at once
            try:
                os.makedirs(cfg.out, exist_ok=True)
            except OSError as exc:
                raise RunError(f"--out {cfg.out}: cannot create the folder ({exc.strerror or exc})")
        torch.set_num_threads(cfg.threads)
        # CPU: strict (an op without a deterministic implementation would raise); CUDA: the
        # deterministic implementations where they exist, a warning for the ops that have none
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % (1 << 32))
        random.seed(cfg.seed)
        self.data = build_data(cfg)
        self.generators = ckpt.make_generators(cfg.seed, self.rank)
        self.method = METHODS[cfg.method](Context(cfg, self.data, self.device, self.generators,
                                                  self.group, self.rank, self.world))
        self.n_train = len(self.data.train_x)
        self.total = total_steps(cfg, self.n_train)
        self.order = DataOrder(self.n_train, ckpt.derive_seed(cfg.seed, "order"))
        self.losses = []
        self.step = 0
        self.init_metrics: Optional[Dict] = None
        self.resumed_from: Optional[int] = None
        self.ckpt_path = os.path.join(cfg.out, ckpt.CHECKPOINT_NAME)

    # -- checkpoints -----------------------------------------------------------------------------
    def _local_state(self) -> Dict:
        return {"rng": ckpt.capture_rng(self.generators)}

    def save(self):
        local = self._local_state()
        if self.group is not None:
            import torch.distributed as dist

            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, local, group=self.group)
        else:
            per_rank = [local]
        if self.rank != 0:
            return
        state = {
            "format": ckpt.CHECKPOINT_FORMAT,
            "config": training_config(self.cfg),
            "step": self.step,
            "losses": list(self.losses),
            "init_metrics": self.init_metrics,
            "modules": {k: m.state_dict() for k, m in self.method.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.method.optimizers.items()},
            "method": self.method.extra_state(),
            "lockstep": None if self.method.lockstep is None else self.method.lockstep.state_dict(),
            "data_order": self.order.state_dict(),
            "per_rank": per_rank,
            "world": self.world,
        }
        ckpt.atomic_torch_save(state, self.ckpt_path)

    def maybe_resume(self):
        cfg = self.cfg
        path = self.ckpt_path if cfg.resume == "auto" else cfg.resume
        if self.rank == 0:  # our own folder only: --resume PATH may point into someone else's
            ckpt.remove_stale_temporaries(cfg.out)
        if not os.path.exists(path):
            if cfg.resume != "auto":
                raise RunError(f"--resume {path}: no such checkpoint")
            print(f"no checkpoint at {path}: starting from step 0", file=sys.stderr)
            return
        try:
            state = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as exc:
            raise RunError(f"--resume: {exc}")
        saved, now = state["config"], training_config(cfg)
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            detail = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})"
                               for k in differ)
            raise RunError(f"checkpoint {path} was written with other settings: {detail}")
        if state["world"] != self.world:
            raise RunError(f"checkpoint {path} was written by {state['world']} processes, this run "
                           f"has {self.world}")
        for k, m in self.method.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.method.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.method.load_extra_state(state["method"])
        if self.method.lockstep is not None:
            self.method.lockstep.load_state_dict(state["lockstep"])
        self.order.load_state_dict(state["data_order"])
        ckpt.restore_rng(state["per_rank"][self.rank]["rng"], self.generators)
        self.step = state["step"]
        self.losses = list(state["losses"])
        self.init_metrics = state["init_metrics"]
        self.resumed_from = self.step
        print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> Dict:
        self.method.train_mode(False)
        try:
            return self.method.evaluate()
        finally:
            self.method.train_mode(True)

    def barrier(self):
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    # -- loop ------------------------------------------------------------------------------------
    def run(self) -> Dict:
        cfg = self.cfg
        if cfg.resume is not None:
            self.maybe_resume()
        if self.step == 0 and cfg.eval_init and self.rank == 0:
            self.init_metrics = self.evaluate()
        self.barrier()
        per_rank = cfg.batch_size // self.world
        memory = PeakMemory(self.device)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True,
                       mininterval=0.5, desc=f"{cfg.method} [{cfg.impl}]", file=sys.stderr)
        step_time, steps_here = 0.0, 0
        self.method.train_mode(True)
        memory.start()
        while self.step < self.total:
            t = time.perf_counter()
            idx = self.order.next(cfg.batch_size)[self.rank * per_rank:(self.rank + 1) * per_rank]
            lr = lr_at(self.step, self.total, cfg.lr, cfg.warmup_steps)
            if self.method.lockstep is not None:  # its calls are plotted per step
                self.method.lockstep.step = self.step + 1
            for opt in self.method.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr
            loss = self.method.train_step(idx, self.step)
            if self.group is not None:  # the whole-batch loss: the mean of the ranks' losses
                import torch.distributed as dist

                loss = loss.detach().clone()
                dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=self.group)
                loss = loss / self.world
            loss = float(loss)
            step_time += time.perf_counter() - t
            steps_here += 1
            self.losses.append(loss)
            self.step += 1
            if not math.isfinite(loss):
                raise RunError(f"the loss is {loss} at step {self.step}; try a lower --lr")
            every = cfg.checkpoint_every
            if self.step == self.total or (every and self.step % every == 0):
                self.save()
            if bar is not None:
                bar.update(1)
                if steps_here % 10 == 0 or self.step == self.total:
                    bar.set_postfix(refresh=False, loss=f"{loss:.4f}",
                                    img_s=f"{steps_here * cfg.batch_size / step_time:,.0f}")
        mem = memory.stop()
        if bar is not None:
            bar.close()
        if steps_here == 0 and not os.path.exists(self.ckpt_path):
            self.save()
        metrics = None
        if self.rank == 0:
            if steps_here == 0:
                metrics = self.finished_metrics()
                print(f"the checkpoint is at step {self.step} of {self.total}: no steps left to "
                      "train" + ("; metrics.json kept as it was" if metrics is not None else ""),
                      file=sys.stderr)
            if metrics is None:
                t_eval = time.perf_counter()
                final = self.evaluate()
                metrics = self.write_outputs(final, mem, step_time, steps_here,
                                             time.perf_counter() - t_eval)
        self.barrier()
        return metrics

    def finished_metrics(self) -> Optional[Dict]:
        """OUT/metrics.json when it was written by the run that reached this very step (same
        config, same losses): a resume that has nothing left to train keeps it, with that run's
        throughput and timings, rather than replace them with those of an empty loop."""
        try:
            with open(os.path.join(self.cfg.out, "metrics.json")) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            return None
        same_run = isinstance(earlier, dict) and earlier.get("config") == training_config(self.cfg) \
            and earlier.get("loss") == self.losses
        return earlier if same_run else None

    def write_outputs(self, final, mem, step_time, steps_here, eval_time) -> Dict:
        cfg = self.cfg
        from contrastive_kernels import __version__

        metrics = {
            "method": cfg.method,
            "data": self.data.name,
            "impl": cfg.impl,
            "impl_resolved": resolved_impl(cfg.impl, self.device),
            "steps": self.total,
            "loss": self.losses,
            **final,
            "knn_top1_init": (self.init_metrics or {}).get("knn_top1"),
            "init_metrics": self.init_metrics,
            "samples_per_s": (steps_here * cfg.batch_size / step_time) if step_time > 0 else None,
            "train_time_s": step_time,
            "eval_time_s": eval_time,
            "wall_time_s": time.perf_counter() - self.t0,
            **mem,
            "resumed_from_step": self.resumed_from,
            "steps_this_process": steps_here,
            "world_size": self.world,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "contrastive_kernels": __version__,
            "dataset": self.data.describe(),
            **self.method.summary(),
            "lockstep": None if self.method.lockstep is None else self.method.lockstep.summary(),
            "lockstep_trace": None if self.method.lockstep is None else self.method.lockstep.state_dict(),
            "config": training_config(cfg),
        }
        ckpt.atomic_write_json(metrics, os.path.join(cfg.out, "metrics.json"))
        plot_loss(self.losses, os.path.join(cfg.out, "loss.png"),
                  f"{cfg.method} on {self.data.name}, --impl {cfg.impl} "
                  f"({metrics['impl_resolved']})")
        return metrics


def run(cfg) -> Dict:
    """One run; the process-wide torch settings it changes (deterministic algorithms, thread
    count) are restored afterwards, so that it can be called from a larger program or a test."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    trainer = None
    finished = False
    try:
        trainer = Trainer(cfg)
        metrics = trainer.run()
        finished = True
        return metrics
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        if trainer is not None and trainer.group is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                if finished:
                    # every rank reaches teardown before any closes its gloo pairs: a rank that
                    # tore down first could abort a peer still sending (std::terminate at exit,
                    # seen under load); after a failure, no barrier (a peer may never come)
                    dist.barrier()
                dist.destroy_process_group()
