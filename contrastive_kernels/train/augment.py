"""Batched image augmentations written in torch (no torchvision), driven by an explicit
``torch.Generator`` so that a run is reproducible and resumable: every call draws its random
numbers from the generator it is given, in a fixed order, with shapes that depend on the batch
size only.

One ``Augment`` call applies, per image:
  1. a random affine map (rotation, isotropic scale, translation; a zoom-in is a random crop, a
     translation a shift with zero padding) through ``F.affine_grid`` + ``F.grid_sample``;
  2. an optional horizontal flip (copy-detection preset only: digits are not flip-invariant);
  3. intensity jitter: contrast (multiply) and brightness (add);
  4. Gaussian pixel noise;
  5. cutout: with probability ``cutout_p`` a ``cutout`` x ``cutout`` square is zeroed;
and clamps to [0, 1].
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Augment:
    rotation: float = 15.0        # degrees, U(-r, r)
    scale: tuple = (0.85, 1.15)   # isotropic zoom, U(lo, hi); > 1 zooms in (a random crop)
    shift: float = 1.0            # pixels, U(-s, s) per axis (zero padding)
    flip_p: float = 0.0           # horizontal flip probability
    contrast: float = 0.3         # multiply by U(1-c, 1+c)
    brightness: float = 0.1       # add U(-b, b)
    noise: float = 0.05           # + N(0, noise^2)
    cutout: int = 3               # side of the zeroed square, pixels
    cutout_p: float = 0.5

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (B, C, H, W) in [0, 1] -> an augmented copy of the same shape."""
        b, _, h, w = x.shape
        g = generator

        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(shape or (b,), generator=g)

        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180.0)
        zoom = uniform(self.scale[0], self.scale[1])
        tx = uniform(-self.shift, self.shift) * (2.0 / w)
        ty = uniform(-self.shift, self.shift) * (2.0 / h)
        flip = torch.rand(b, generator=g) < self.flip_p
        contrast = uniform(1.0 - self.contrast, 1.0 + self.contrast)
        brightness = uniform(-self.brightness, self.brightness)
        noise = torch.randn(x.shape, generator=g) * self.noise
        cut_on = torch.rand(b, generator=g) < self.cutout_p
        cut_y = torch.randint(0, max(1, h - self.cutout + 1), (b,), generator=g)
        cut_x = torch.randint(0, max(1, w - self.cutout + 1), (b,), generator=g)

        # theta maps output coordinates to input coordinates: a zoom-in samples a smaller area
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        sign = torch.where(flip, -1.0, 1.0)
        theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1),
                             torch.stack([sin * sign, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out * contrast.view(b, 1, 1, 1) + brightness.view(b, 1, 1, 1) + noise
        if self.cutout > 0:
            ys = torch.arange(h).view(1, h, 1)
            xs = torch.arange(w).view(1, 1, w)
            inside = ((ys >= cut_y.view(b, 1, 1)) & (ys < (cut_y + self.cutout).view(b, 1, 1))
                      & (xs >= cut_x.view(b, 1, 1)) & (xs < (cut_x + self.cutout).view(b, 1, 1)))
            out = out.masked_fill((inside & cut_on.view(b, 1, 1)).unsqueeze(1), 0.0)
        return out.clamp(0.0, 1.0)


# presets: "digits" is the default two-view augmentation; "light" is used for CLIP images and the
# multilabel composites (labels must survive); "copy" makes copy-detection style transformed copies
PRESETS = {
    "digits": Augment(),
    "light": Augment(rotation=10.0, scale=(0.9, 1.1), shift=1.0, contrast=0.2, brightness=0.05,
                     noise=0.03, cutout=2, cutout_p=0.3),
    "copy": Augment(rotation=12.0, scale=(0.9, 1.2), shift=1.5, flip_p=0.5, contrast=0.3,
                    brightness=0.1, noise=0.05, cutout=4, cutout_p=0.3),
    "none": Augment(rotation=0.0, scale=(1.0, 1.0), shift=0.0, contrast=0.0, brightness=0.0,
                    noise=0.0, cutout=0, cutout_p=0.0),
}


def scaled(base: Augment, strength: float) -> Augment:
    """``base`` with every magnitude multiplied by ``strength`` (the --aug-strength flag)."""
    if strength == 1.0:
        return base
    lo, hi = base.scale
    return dataclasses.replace(
        base, rotation=base.rotation * strength,
        scale=(1.0 - (1.0 - lo) * strength, 1.0 + (hi - 1.0) * strength),
        shift=base.shift * strength, contrast=min(0.95, base.contrast * strength),
        brightness=base.brightness * strength, noise=base.noise * strength,
        cutout_p=min(1.0, base.cutout_p * strength))
