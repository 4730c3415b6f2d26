"""Data sets for the training loop: nothing is downloaded.

- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits, 10
  classes), pixels scaled to [0, 1]. A fixed, stratified held-out split (20% of each class, drawn
  with split seed 0 whatever ``--seed`` is) serves kNN evaluation.
- ``synthetic``: procedural images of any count and size. For classification methods, eight
  shape classes (disk, ring, square, frame, plus, cross, stripes, triangle) at random position,
  size and intensity over a faint random background. For ``qk`` a copy-detection set instead:
  base images made of three random shapes over a random sinusoidal background; training pairs
  a base image with a transformed copy (the "copy" augmentation), the key bank holds distractor
  images, and evaluation retrieves the base image of held-out copies among held-out bases plus
  the distractors.
- two-item composites for ``multilabel``: two images of the split side by side (8x16 for
  digits), multi-hot labels over the classes of both halves.

Captions for ``clip`` come from a small fixed vocabulary ("a handwritten seven", "the digit
seven", ...) tokenized into word ids (see ``Captions``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch

SPLIT_SEED = 0          # the held-out split never depends on --seed
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPE_NAMES = ["disk", "ring", "square", "frame", "plus", "cross", "stripes", "triangle"]


@dataclasses.dataclass
class Dataset:
    """Images (N, 1, H, W) in [0, 1]; labels (N,) int64 or (N, C) multi-hot float."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: List[str]
    kind: str = "classes"               # "classes" | "multilabel" | "copy"
    extra: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self):
        return tuple(self.train_x.shape[1:])

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_x)} train / {len(self.test_x)} held-out images of "
                f"{'x'.join(map(str, self.image_shape))}, {self.num_classes} classes ({self.kind})")


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def load_digits(test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = _stratified_split(y, test_fraction, SPLIT_SEED)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], list(DIGIT_NAMES))


# --------------------------------------------------------------------------------------------
# procedural images
# --------------------------------------------------------------------------------------------

def _grid(size: int):
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0  # in (-1, 1)
    return coords.view(1, size, 1), coords.view(1, 1, size)


def render_shapes(kinds: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One shape per image: kinds (N,) in [0, 8) -> (N, size, size) masks in [0, 1] at a random
    center, radius and angle."""
    n = kinds.shape[0]
    yy, xx = _grid(size)
    cy = (torch.rand(n, generator=g) - 0.5) * 0.8
    cx = (torch.rand(n, generator=g) - 0.5) * 0.8
    r = 0.35 + 0.3 * torch.rand(n, generator=g)
    ang = torch.rand(n, generator=g) * (math.pi / 4)
    cy, cx, r, ang = (t.view(n, 1, 1) for t in (cy, cx, r, ang))
    dy, dx = yy - cy, xx - cx
    u = dx * torch.cos(ang) + dy * torch.sin(ang)   # rotated coordinates
    v = -dx * torch.sin(ang) + dy * torch.cos(ang)
    dist = torch.sqrt(dy ** 2 + dx ** 2)
    cheb = torch.maximum(u.abs(), v.abs())
    thick = 0.12 + 0.0 * r
    masks = torch.stack([
        (dist <= r),                                                    # disk
        (dist <= r) & (dist >= r - 2 * thick),                          # ring
        (cheb <= r * 0.85),                                             # square
        (cheb <= r * 0.85) & (cheb >= r * 0.85 - 2 * thick),            # frame
        (cheb <= r) & ((u.abs() <= thick) | (v.abs() <= thick)),        # plus
        (dist <= r) & (((u - v).abs() <= 1.4 * thick) | ((u + v).abs() <= 1.4 * thick)),  # cross
        (cheb <= r) & (torch.remainder(v / (2 * thick) + 10.0, 2.0) < 1.0),  # stripes
        (v <= r * 0.7) & (v >= -r * 0.9) & (u.abs() <= (r * 0.7 - v) * 0.6),  # triangle
    ], 1).float()
    return masks[torch.arange(n), kinds]


def synthetic_shapes(n: int, size: int, seed: int) -> tuple:
    """n labelled shape images (N, 1, size, size) and labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPE_NAMES), (n,), generator=g)
    shape = render_shapes(labels, size, g)
    intensity = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    background = 0.15 * torch.rand(n, size, size, generator=g)
    img = torch.maximum(shape * intensity, background)
    return img.unsqueeze(1).clamp(0, 1), labels


def synthetic_scenes(n: int, size: int, seed: int, shapes_per_image: int = 3) -> torch.Tensor:
    """Unlabelled base images for copy detection: a few random shapes over a random wave."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = _grid(size)
    fy = (torch.rand(n, 1, 1, generator=g) - 0.5) * 6
    fx = (torch.rand(n, 1, 1, generator=g) - 0.5) * 6
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    img = 0.2 * (1 + torch.sin(fy * yy * math.pi + fx * xx * math.pi + phase)) / 2
    for _ in range(shapes_per_image):
        kinds = torch.randint(0, len(SHAPE_NAMES), (n,), generator=g)
        level = 0.3 + 0.7 * torch.rand(n, 1, 1, generator=g)
        img = torch.maximum(img, render_shapes(kinds, size, g) * level)
    return img.unsqueeze(1).clamp(0, 1)


def load_synthetic(n: int, size: int, test_fraction: float = 0.2) -> Dataset:
    x, y = synthetic_shapes(n, size, seed=SPLIT_SEED + 1)
    tr, te = _stratified_split(y, test_fraction, SPLIT_SEED)
    return Dataset("synthetic", x[tr], y[tr], x[te], y[te], list(SHAPE_NAMES))


def load_copy_detection(n: int, size: int, n_distractors: int, test_fraction: float = 0.2) -> Dataset:
    """Copy-detection set: every base image is its own class. ``extra``: ``distractors``
    (bank images, disjoint from the bases) and ``test_copies`` (fixed transformed copies of the
    held-out bases; test_y[i] is the base each copy comes from)."""
    from .augment import PRESETS

    x = synthetic_scenes(n, size, seed=SPLIT_SEED + 2)
    n_test = max(1, int(round(test_fraction * n)))
    train_x, test_x = x[n_test:], x[:n_test]
    distractors = synthetic_scenes(n_distractors, size, seed=SPLIT_SEED + 3)
    copies = PRESETS["copy"](test_x, torch.Generator().manual_seed(SPLIT_SEED + 4))
    return Dataset("synthetic-copy", train_x, torch.arange(len(train_x)), test_x,
                   torch.arange(n_test), [f"image{i}" for i in range(len(train_x))], kind="copy",
                   extra={"distractors": distractors, "test_copies": copies})


# --------------------------------------------------------------------------------------------
# composites (multilabel) and captions (clip)
# --------------------------------------------------------------------------------------------

def side_by_side(base_x: torch.Tensor, base_y: torch.Tensor, n: int, num_classes: int, seed: int):
    """n composites: image i's left half is base image a_i, its right half base image b_i
    (whole images placed side by side); multi-hot labels of both."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, len(base_x), (n,), generator=g)
    b = torch.randint(0, len(base_x), (n,), generator=g)
    x = torch.cat([base_x[a], base_x[b]], dim=-1)
    y = torch.zeros(n, num_classes)
    y[torch.arange(n), base_y[a]] = 1.0
    y[torch.arange(n), base_y[b]] = 1.0
    return x, y


def make_multilabel(base: Dataset, n_train: int, n_test: int) -> Dataset:
    """Two-item composites built from the train (resp. held-out) split only, so no held-out image
    leaks into training."""
    c = base.num_classes
    trx, try_ = side_by_side(base.train_x, base.train_y, n_train, c, SPLIT_SEED + 5)
    tex, tey = side_by_side(base.test_x, base.test_y, n_test, c, SPLIT_SEED + 6)
    return Dataset(f"{base.name}-pairs", trx, try_, tex, tey, base.class_names, kind="multilabel")


CAPTION_TEMPLATES = ["a handwritten {}", "the digit {}", "a picture of a {}", "a {} written by hand",
                     "a small {}"]
SHAPE_TEMPLATES = ["a {}", "a picture of a {}", "a small {}", "the shape {}", "a bright {}"]


class Captions:
    """Captions and their tokenization over a fixed vocabulary (word ids; 0 = padding)."""

    def __init__(self, class_names: List[str], digits: bool = True, max_words: int = 12):
        self.class_names = class_names
        self.templates = CAPTION_TEMPLATES if digits else SHAPE_TEMPLATES
        words = {"and"}
        for t in self.templates:
            words.update(t.replace("{}", " ").split())
        words.update(class_names)
        self.vocab = ["<pad>", "<unk>"] + sorted(words)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_words = max_words

    def caption(self, label: int, template: int) -> str:
        return self.templates[template].format(self.class_names[label])

    def sample(self, labels: torch.Tensor, g: torch.Generator) -> List[str]:
        """One caption per label with a random template."""
        templates = torch.randint(0, len(self.templates), (labels.shape[0],), generator=g)
        return [self.caption(int(l), int(t)) for l, t in zip(labels.tolist(), templates.tolist())]

    def tokenize(self, captions: List[str]) -> torch.Tensor:
        ids = torch.zeros(len(captions), self.max_words, dtype=torch.long)
        for i, text in enumerate(captions):
            tokens = [self.index.get(w, 1) for w in text.split()][: self.max_words]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids


def compose_halves(x: torch.Tensor, captions: List[str], rate: float, g: torch.Generator):
    """CLIP-C compositions (Aladago et al. 2024) at rate ``rate``: a fraction of the batch is
    replaced by composites of two of its images: with probability 1/2 the left half of image i
    next to the right half of image j, otherwise the top half of i above the bottom half of j
    (j = a random other row of the batch); the caption is caption_i + " and " + caption_j.
    Returns the new images, captions and the (B,) bool mask of composite rows."""
    b, _, h, w = x.shape
    chosen = torch.rand(b, generator=g) < rate
    partner = (torch.arange(b) + torch.randint(1, max(2, b), (b,), generator=g)) % b
    vertical_cut = torch.rand(b, generator=g) < 0.5
    cols = torch.arange(w).view(1, 1, 1, w)
    rows = torch.arange(h).view(1, 1, h, 1)
    take_first = torch.where(vertical_cut.view(b, 1, 1, 1), cols < w // 2, rows < h // 2)
    mixed = torch.where(take_first, x, x[partner])
    out = torch.where(chosen.view(b, 1, 1, 1), mixed, x)
    texts = [f"{captions[i]} and {captions[int(partner[i])]}" if bool(chosen[i]) else captions[i]
             for i in range(b)]
    return out, texts, chosen


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------

class DataOrder:
    """A resumable stream of shuffled indices: a fresh permutation (from its own generator) each
    epoch; a batch that runs past the end of one epoch continues into the next, so no sample is
    dropped. ``state_dict`` holds the generator state, the current permutation and the position."""

    def __init__(self, n: int, seed: int):
        if n < 1:  # next() would loop forever, taking nothing from empty permutations
            raise ValueError(f"DataOrder needs at least one sample, got n={n}")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.perm: Optional[torch.Tensor] = None
        self.pos = 0
        self.epoch = 0

    def next(self, batch: int) -> torch.Tensor:
        parts, need = [], batch
        while need > 0:
            if self.perm is None or self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
                self.epoch += 1
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts)

    def state_dict(self):
        return {"n": self.n, "generator": self.generator.get_state(), "perm": self.perm,
                "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state):
        if state["n"] != self.n:
            raise ValueError(f"data-order state is for {state['n']} samples, this run has {self.n}")
        self.generator.set_state(state["generator"])
        self.perm, self.pos, self.epoch = state["perm"], state["pos"], state["epoch"]
