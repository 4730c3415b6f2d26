"""Loss-curve PNGs and the side-by-side markdown report of ``--compare``."""
from __future__ import annotations

import io
import math
from typing import Dict, List, Optional

from .checkpoint import atomic_write_bytes


def _smooth(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(losses: List[float], path: str, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.45, label="per step")
    ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), lw=1.8, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def relative_differences(a: List[float], b: List[float]) -> List[float]:
    """|a - b| / max(|b|, 1e-12), step by step, over the common length."""
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


def per_step_max(values: List[float], call_step: List[Optional[int]]) -> Dict[int, float]:
    """Per-call values -> {step: the largest of its calls}, steps in order (a step may make 0,
    1 or 2 loss calls; calls of an unknown step, None, are left out)."""
    out: Dict[int, float] = {}
    for step, value in zip(call_step, values):
        if step is not None:
            out[step] = max(out.get(step, value), value)
    return dict(sorted(out.items()))


def plot_compare(curves: Dict[str, List[float]], path: str, title: str,
                 lockstep: Dict[str, Dict[int, float]] = None) -> None:
    """All loss curves on one axes; below, each curve's relative difference to the first
    (free-running) and, when given, the lockstep relative loss difference of each step (the
    largest over the step's loss calls; see ``per_step_max``)."""
    plt = _pyplot()
    names = list(curves)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    styles = ["-", "--", ":", "-."]
    for i, name in enumerate(names):
        ax.plot(range(1, len(curves[name]) + 1), curves[name], styles[i % 4], lw=1.0, label=name)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    base = curves[names[0]]
    for i, name in enumerate(names[1:], 1):
        rel = relative_differences(curves[name], base)
        ax2.plot(range(1, len(rel) + 1), [max(r, 1e-10) for r in rel], styles[i % 4], lw=0.8,
                 label=f"free-running: |{name} - {names[0]}| / |{names[0]}|")
    for i, (name, by_step) in enumerate((lockstep or {}).items(), 1):
        ax2.plot(list(by_step), [max(r, 1e-10) for r in by_step.values()], lw=0.8,
                 color=f"C{i + 2}", label=f"lockstep: same inputs, {name} vs {names[0]} "
                                          "(largest of the step's loss calls)")
    ax2.set_yscale("log")
    ax2.axhline(1e-3, color="gray", lw=0.8, ls="--")
    ax2.set_xlabel("step")
    ax2.set_ylabel("relative difference\n(0 drawn at 1e-10)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _fmt(value, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def compare_markdown(runs: Dict[str, Dict], free: Dict[str, Dict], lockstep: Dict[str, Dict],
                     reproducible: bool, environment: str) -> str:
    names = list(runs)
    first = runs[names[0]]
    cfg = first["config"]
    lines = [
        f"Training comparison: --method {cfg['method']} --data {cfg['data']}, {first['steps']} steps, "
        f"batch {cfg['batch_size']}, seed {cfg['seed']}; {environment}",
        "",
        "| impl | loss backend | final loss | kNN top-1 | kNN top-1 at init | samples/s | "
        "peak memory (MiB) | train time (s) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in runs.items():
        extra = (f" (+{m['peak_memory_extra_mb']:.0f} in the loop)"
                 if m.get("peak_memory_extra_mb") is not None else "")
        lines.append(
            f"| {name} | {m['impl_resolved']} | {_fmt(m['loss'][-1])} | {_fmt(m['knn_top1'])} | "
            f"{_fmt(m.get('knn_top1_init'))} | {_fmt(m['samples_per_s'])} | "
            f"{_fmt(m['peak_memory_mb'])}{extra} | {_fmt(m['train_time_s'], 3)} | "
            f"{_fmt(m['wall_time_s'], 3)} |")
    lines.append("")
    base = names[0]
    for name, c in lockstep.items():
        lines.append(
            f"- lockstep, {name} vs {base} (the same inputs and parameters at each of {c['calls']} "
            f"loss calls): max relative loss difference {c['max_rel_loss_diff']:.3g}, max relative "
            f"gradient difference {c['max_rel_grad_diff']:.3g}; tolerance {c['tolerance']:g}: "
            f"{'within' if c['within_tolerance'] else 'EXCEEDED'}")
    for name, d in free.items():
        beyond = d["first_step_beyond_tolerance"]
        lines.append(
            f"- free-running, {name} vs {base}: identical losses for the first {d['identical_steps']} "
            f"steps; max relative difference {d['max_rel_diff']:.3g} (step {d['argmax_step']}), mean "
            f"{d['mean_rel_diff']:.3g}"
            + (f"; beyond 1e-3 from step {beyond} on: training is chaotic, so independent runs "
               "separate once any rounding differs (compare the final loss and kNN instead)"
               if beyond is not None else "; within 1e-3 throughout"))
    lines.append(f"- the lockstep run reproduces the {base} run's losses bit for bit: "
                 f"{'yes' if reproducible else 'NO'}")
    if first.get("memory_measure"):
        lines.append(f"- peak memory: {first['memory_measure']}")
    return "\n".join(lines) + "\n"
