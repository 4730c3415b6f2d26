"""Command line of ``python -m contrastive_kernels.train``: flags, per-method defaults, and the
checks that turn bad values into usage errors (exit code 2) instead of tracebacks."""
from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List, Optional

METHODS = ("moco", "simclr", "clip", "supcon", "spp", "qk", "multilabel")
DATASETS = ("digits", "synthetic")
IMPLS = ("reference", "chunked", "triton", "cuda", "cpu", "auto")
SIMILARITIES = ("dot", "cosine", "l2")

# Defaults that differ per method; every other flag has one default. The moco column is the
# default job (`python -m contrastive_kernels.train`), tuned to reach kNN top-1 >= 0.90 on the
# digits held-out split well inside a minute on a 2-core CPU (see README).
METHOD_DEFAULTS: Dict[str, Dict] = {
    "moco":       dict(steps=800, batch_size=256, temperature=0.2, similarity="dot", lr=2e-3),
    "simclr":     dict(steps=600, batch_size=256, temperature=0.2, similarity="cosine", lr=2e-3),
    "clip":       dict(steps=600, batch_size=256, temperature=0.07, similarity="dot", lr=2e-3),
    "supcon":     dict(steps=400, batch_size=256, temperature=0.1, similarity="cosine", lr=2e-3),
    "spp":        dict(steps=600, batch_size=256, temperature=0.2, similarity="cosine", lr=2e-3),
    "qk":         dict(steps=800, batch_size=256, temperature=0.1, similarity="dot", lr=2e-3),
    "multilabel": dict(steps=400, batch_size=128, temperature=0.1, similarity="cosine", lr=2e-3),
}

# flags that do not change the computation: a run may be resumed with different values
NON_TRAINING_KEYS = {"resume", "checkpoint_every", "out", "progress", "compare", "eval_init"}

DESCRIPTION = """\
Reference training loop of contrastive_kernels: contrastive methods on small real (scikit-learn
digits) or procedural data, with the loss backend swappable (--impl) and nothing else changed.

  python -m contrastive_kernels.train                          # MoCo on digits (the default job)
  python -m contrastive_kernels.train --compare reference,auto # eager vs fused, side by side
  python -m contrastive_kernels.train --method simclr --mixing 64,32,16 --tau-plus 0.05
  python -m contrastive_kernels.train --method clip --compose 0.3
  python -m contrastive_kernels.train --method qk --data synthetic --similarity l2
  python -m contrastive_kernels.train --resume --out runs/moco  # continue a killed run
"""


class UsageError(Exception):
    """A bad flag value found after parsing; reported through parser.error (exit code 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


# torch.manual_seed takes a signed or an unsigned 64-bit integer
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [{SEED_MIN}, {SEED_MAX}] "
                                         f"(torch.manual_seed's range), got {value}")
    return value


def _float_in(low: float, high: float, low_open=False, high_open=False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"expected a value in {lo}{low}, {high}{hi}, got {text}")
        return value
    return parse


def parse_mixing(text: str):
    """'N,s,s2' -> (n_hard, n_synthetic, n_query_synthetic); 'N,s' means s2 = 0."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in (2, 3) or min(values) < 0 or values[0] < 1 \
            or values[1] + (values[2] if len(values) == 3 else 0) < 1:
        raise argparse.ArgumentTypeError(
            f"expected N,s,s' (hard negatives N >= 1, synthetic s >= 0 from pairs of them and s' >= 0 "
            f"mixed with the query, s + s' >= 1), e.g. 64,32,16; got {text!r}")
    if len(values) == 2:
        values.append(0)
    return tuple(values)


def parse_switch(text: str):
    """'50' -> (50, 'steps'); '2e' -> (2, 'epochs')."""
    unit = "epochs" if text.endswith("e") else "steps"
    body = text[:-1] if unit == "epochs" else text
    try:
        value = int(body)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of steps (e.g. 100) or of "
                                         f"epochs with an 'e' suffix (e.g. 2e), got {text!r}")
    return (value, unit)


def parse_impls(text: str, minimum: int = 2) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in IMPLS]
    if bad or len(names) < minimum or len(set(names)) != len(names):
        what = "two or more distinct implementations" if minimum > 1 else "distinct implementations"
        raise argparse.ArgumentTypeError(
            f"expected {what} separated by commas, from {', '.join(IMPLS)}; got {text!r}")
    return names


def parse_shadow(text: str) -> List[str]:
    return parse_impls(text, minimum=1)


def _per_method_default(key: str) -> str:
    """'256; multilabel 128': the default most methods share, then the methods that differ."""
    values = [d[key] for d in METHOD_DEFAULTS.values()]
    common = max(values, key=values.count)
    others = [f"{m} {d[key]}" for m, d in METHOD_DEFAULTS.items() if d[key] != common]
    return "; ".join([str(common)] + others)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m contrastive_kernels.train", description=DESCRIPTION,
        usage="%(prog)s [--method METHOD] [--data DATA] [--impl IMPL] [--compare IMPL,IMPL] "
              "[--steps N] [--out DIR] [--resume] [options] (--help lists them all)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", choices=METHODS, default="moco", help="training method (default moco)")
    a("--data", choices=DATASETS, default="digits",
      help="digits (scikit-learn's 8x8 digits, real) or synthetic (procedural; copy-detection "
           "style for qk) (default digits)")
    a("--impl", choices=IMPLS, default="auto",
      help="loss backend; changes nothing else (default auto)")
    a("--compare", type=parse_impls, default=None, metavar="IMPL,IMPL",
      help="run once per implementation (same seed, same data order), then once more with the "
           "lockstep check, and report them side by side")
    a("--shadow-impl", type=parse_shadow, default=None, metavar="IMPL[,IMPL]",
      help="lockstep check: at every step also evaluate each loss (value and input gradients) "
           "with these implementations on the same inputs; the run itself is unchanged")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help="optimizer steps (default per method; moco 800)")
    g.add_argument("--epochs", type=_float_in(0, math.inf, low_open=True), default=None,
                   help="train for this many passes over the training split instead of --steps")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per step, over all processes "
                        f"(default {_per_method_default('batch_size')})")
    g.add_argument("--lr", type=_float_in(0, math.inf, low_open=True), default=None,
                   help="peak AdamW learning rate (default 2e-3)")
    g.add_argument("--weight-decay", type=_float_in(0, math.inf), default=1e-4,
                   help="AdamW weight decay (default 1e-4)")
    g.add_argument("--warmup-steps", type=_nonnegative_int, default=40,
                   help="linear warm-up over this many steps, at most a tenth of the run's steps, "
                        "then cosine decay to 0 (default 40)")
    g = p.add_argument_group("loss")
    g.add_argument("--temperature", type=_float_in(0, math.inf, low_open=True), default=None,
                   help="softmax temperature (clip: 1 / initial logit scale) (default per method)")
    g.add_argument("--similarity", choices=SIMILARITIES, default=None,
                   help="similarity inside the loss (default: dot on normalized features for "
                        "moco/qk/clip, cosine otherwise)")
    g.add_argument("--queue-size", type=_positive_int, default=1024, help="moco queue (default 1024)")
    g.add_argument("--momentum", type=_float_in(0, 1, high_open=True), default=0.99,
                   help="moco key-encoder EMA momentum (default 0.99)")
    g.add_argument("--mixing", type=parse_mixing, default=None, metavar="N,s,s'",
                   help="moco: MoCHi (info_nce(mixing=)); simclr: synthetic hard negatives "
                        "(nt_xent(mixing=)): the N hardest negatives, s mixed pairs, s' query mixes")
    g.add_argument("--tau-plus", type=_float_in(0, 1, high_open=True), default=0.0,
                   help="debiased contrastive loss class prior (moco, simclr)")
    g.add_argument("--beta", type=_float_in(0, math.inf), default=0.0,
                   help="hard-negative reweighting concentration (moco, simclr)")
    g.add_argument("--compose", type=_float_in(0, 1), default=0.0, metavar="RHO",
                   help="clip: CLIP-C composite rate in [0, 1] (default 0)")
    g.add_argument("--spp-k", type=_positive_int, default=5,
                   help="spp: neighbours per image considered (default 5)")
    g.add_argument("--spp-threshold", type=_float_in(-1, 1), default=0.9,
                   help="spp: cosine similarity a semantic pair needs (default 0.9)")
    g.add_argument("--spp-encoder", choices=("pca", "random"), default="pca",
                   help="spp: the frozen encoder that mines pairs: raw-pixel PCA (default) or a "
                        "randomly initialized conv net")
    g.add_argument("--bank-size", type=_positive_int, default=2048,
                   help="qk: cached key features used as negatives (default 2048)")
    g.add_argument("--qk-switch", type=parse_switch, default=(100, "steps"), metavar="N|Ne",
                   help="qk: alternate the trained side every N steps (or N epochs: '2e') "
                        "(default 100)")
    g.add_argument("--label-ratio", type=_float_in(0, 1, low_open=True), default=0.3,
                   help="multilabel: labelled fraction of the training images (default 0.3)")
    g.add_argument("--pseudo-quantile", type=_float_in(0, 1), default=1.0,
                   help="multilabel: a pseudo-label's class score must exceed this quantile of "
                        "the batch's labelled negatives' scores (default 1: all of them)")
    g.add_argument("--pseudo-warmup", type=_nonnegative_int, default=100,
                   help="multilabel: steps before pseudo-labels are used (default 100)")
    g = p.add_argument_group("model and data")
    g.add_argument("--width", type=_positive_int, default=32, help="conv channels (default 32)")
    g.add_argument("--feat-dim", type=_positive_int, default=128,
                   help="backbone feature size, used by kNN (default 128)")
    g.add_argument("--embed-dim", type=_positive_int, default=64,
                   help="projection size fed to the loss (default 64)")
    g.add_argument("--aug-strength", type=_float_in(0, 3), default=1.0,
                   help="scales every augmentation magnitude (default 1)")
    g.add_argument("--num-samples", type=_positive_int, default=2000,
                   help="synthetic: images generated (default 2000)")
    g.add_argument("--image-size", type=_positive_int, default=16,
                   help="synthetic: side in pixels (default 16)")
    g.add_argument("--knn-k", type=_positive_int, default=20, help="kNN neighbours (default 20)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seeds the run's random draws (initialization, augmentation, data "
                        "order); the data sets and the held-out split never depend on it "
                        "(default 0)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the models are tiny, so intra-op threads "
                        "gain little and slow down badly when the cores are shared); part of "
                        "the run's config, since it may change the rounding")
    g.add_argument("--out", default=None, help="output folder (default runs/<method>)")
    g.add_argument("--checkpoint-every", type=_nonnegative_int, default=100,
                   help="steps between checkpoints; 0 = only at the end (default 100)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint.pt (or the given file); starts fresh when "
                        "there is none yet")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel under torchrun: gloo on CPU, nccl on GPU; group= is passed "
                        "to the losses and the MoCo queue")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    g.add_argument("--no-eval-init", dest="eval_init", action="store_false",
                   help="skip the kNN evaluation of the untrained encoder")
    return p


def out_problem(out: str) -> Optional[str]:
    """Why the --out folder cannot be used, or None: checked before any data or model is built,
    and without creating anything (the run creates the folder)."""
    if not out:
        return "--out must name a folder, got ''"
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {out} exists and is not a folder"
    existing = path  # the nearest existing folder above: where the run will create its own
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--out {out}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable (no permission or a read-only file system)"
    return None


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill per-method defaults and check combinations (parser.error on a bad one)."""
    defaults = METHOD_DEFAULTS[args.method]
    for key in ("batch_size", "temperature", "similarity", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.steps is not None and args.epochs is not None:
        parser.error("give --steps or --epochs, not both")
    if args.steps is None and args.epochs is None:
        args.steps = defaults["steps"]
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (contrastive losses need negatives)")
    if args.mixing is not None and args.method not in ("moco", "simclr"):
        parser.error("--mixing applies to --method moco or simclr")
    if args.mixing is not None:
        n_hard = args.mixing[0]
        if args.method == "moco" and n_hard > args.queue_size:
            parser.error(f"--mixing N={n_hard} exceeds --queue-size {args.queue_size}")
        if args.method == "simclr" and n_hard > 2 * args.batch_size - 2:
            parser.error(f"--mixing N={n_hard} exceeds the 2B-2 = {2 * args.batch_size - 2} "
                         "in-batch negatives of simclr")
    if (args.tau_plus or args.beta) and args.method not in ("moco", "simclr"):
        parser.error("--tau-plus/--beta apply to --method moco or simclr")
    if args.compose and args.method != "clip":
        parser.error("--compose applies to --method clip")
    if args.distributed and args.method == "simclr" and args.mixing is not None:
        parser.error("--mixing with --method simclr is not supported with --distributed "
                     "(nt_xent(group=) has no mixing)")
    if args.shadow_impl is not None and args.distributed:
        parser.error("--shadow-impl is a single-process check; leave out --distributed")
    if args.compare is not None and args.distributed:
        parser.error("--compare runs the implementations in sub-processes; run --distributed jobs "
                     "one --impl at a time")
    if args.out is None:
        args.out = os.path.join("runs", args.method)
    problem = out_problem(args.out)
    if problem:
        parser.error(problem)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (args.device == "cpu" or args.device == "cuda" or
            (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device} was asked for but torch sees no CUDA device")
    return args


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    return resolve(args, parser)


def training_config(args: argparse.Namespace) -> Dict:
    """The flags that determine the computation (what a resumed run must match), JSON-ready."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in NON_TRAINING_KEYS:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _format(dest: str, value) -> str:
    if dest == "mixing":
        return ",".join(str(v) for v in value)
    if dest == "qk_switch":
        return f"{value[0]}e" if value[1] == "epochs" else str(value[0])
    if dest in ("compare", "shadow_impl"):
        return ",".join(value)
    return repr(value) if isinstance(value, float) else str(value)


def to_argv(args: argparse.Namespace, skip=()) -> List[str]:
    """Command-line flags that reproduce ``args`` exactly (every value explicit), leaving out
    the destinations in ``skip``. ``parse_args(to_argv(a)) == a`` (see tests)."""
    out: List[str] = []
    for action in build_parser()._actions:
        dest = action.dest
        if not action.option_strings or dest == "help" or dest in skip:
            continue
        value = getattr(args, dest)
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if value != action.default:
                out.append(flag)
        elif value is None:
            continue
        elif dest == "resume":
            out += [flag] if value == "auto" else [flag, value]
        else:
            out += [flag, _format(dest, value)]
    return out
