"""Training-time distortions that make MNIST look like other people's handwriting.

Real digits differ from MNIST's in the pen (thicker or thinner strokes), the slant, the size
and width, a wobble of the hand, and where they sit. `distort` draws all of that at random
for each image of a batch, as tensor operations on the whole batch (no per-image Python):

1. stroke width: grey-level dilation or erosion (a 3x3 max-pool of the ink or of its
   negative), blended in by a random amount;
2. one affine map per image: rotation, shear (slant), scale and aspect, shift;
3. elastic distortion (Simard et al., 2003): a smooth random displacement field, drawn on a
   4x4 grid and upsampled, added to the affine sampling grid;

then one `grid_sample` call. The random numbers come from a CPU generator, so a seed gives
the same distortions on any device, and a run's state can save and restore it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Distortion:
    """How far `distort` goes; each image draws uniformly within these bounds."""

    thicker: float = 0.8  # blend up to this much of a 3x3 dilation in (a 2-3 px MNIST stroke gets ~1 px wider)
    thinner: float = 0.3  # ... or up to this much of a 3x3 erosion
    degrees: float = 10.0  # rotation, either way
    shear: float = 0.25  # slant: x moves by up to this times y
    scale: tuple[float, float] = (0.9, 1.1)  # size
    aspect: float = 0.15  # width / height changes by up to this fraction
    shift: float = 2.0  # pixels, each axis
    elastic: float = 1.0  # pixels: the largest displacement of the smooth field
    elastic_grid: int = 4  # the field's control points per side


# Measured (docs/NOTES.md): stronger settings (thinner 0.5, 12 degrees, shear 0.35, scale 0.85-1.1,
# aspect 0.2, elastic 1.5 px) read no more handwriting and cost the best preset 0.05-0.1 points on MNIST.
HANDWRITING = Distortion()


def distort(images: torch.Tensor, generator: torch.Generator, how: Distortion = HANDWRITING) -> torch.Tensor:
    """Randomly distorted copies of normalised images (B, 1, H, W) whose background is -1."""
    b, _, h, w = images.shape

    def uniform(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * (high - low) + low).to(images.device, images.dtype)

    ink = (images + 1) / 2  # 0 = background
    t = uniform(b, 1, 1, 1, low=-how.thinner, high=how.thicker)
    thicker = F.max_pool2d(ink, 3, 1, 1)
    thinner = -F.max_pool2d(-ink, 3, 1, 1)
    ink = ink + t.clamp(min=0) * (thicker - ink) + (-t).clamp(min=0) * (thinner - ink)

    angle = uniform(b) * math.radians(how.degrees)
    shear = uniform(b) * how.shear
    size = uniform(b, low=how.scale[0], high=how.scale[1])
    aspect = 1 + uniform(b) * how.aspect
    # affine_grid maps output coordinates to input ones: dividing by the size enlarges the digit
    sx, sy = aspect / size, 1 / (aspect * size)
    cos, sin = angle.cos(), angle.sin()
    # rotation @ shear @ scale
    a = torch.stack([torch.stack([cos * sx, (cos * shear - sin) * sy], 1),
                     torch.stack([sin * sx, (sin * shear + cos) * sy], 1)], 1)  # (B, 2, 2)
    offset = uniform(b, 2) * how.shift * 2 / torch.tensor([w, h], device=images.device, dtype=images.dtype)
    theta = torch.cat([a, offset.unsqueeze(2)], 2)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    if how.elastic > 0:
        g = how.elastic_grid
        field = uniform(b, 2, g, g) * uniform(b, 1, 1, 1, low=0.0, high=1.0)
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
        pixel = torch.tensor([2 / w, 2 / h], device=images.device, dtype=images.dtype)
        grid = grid + field.permute(0, 2, 3, 1) * how.elastic * pixel
    # zeros from outside the image are background
    moved = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved.clamp(0, 1) * 2 - 1


def non_digits(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Non-digits made from digits (B, 1, H, W), background -1: one of four per image, at random.

    - mirrored left to right, or turned a quarter (a mirrored 3 is an epsilon, a 7 on its side a
      hook); 0, 1 and 8 stay digits under both, so they are overlaid instead;
    - two digits overlaid, the second shifted by a quarter to a third of the width (a scribble);
    - the four quarters shuffled (strokes that do not make a shape).

    For outlier exposure (Hendrycks et al., 2019): the model is trained to give these a flat
    distribution, so that what is not a digit comes out unsure. Everything is made from the
    training digits themselves.
    """
    b, _, h, w = images.shape
    kind = torch.randint(0, 4, (b,), generator=generator).to(images.device)
    symmetric = (labels == 0) | (labels == 1) | (labels == 8)
    kind = torch.where(symmetric & (kind < 2), torch.full_like(kind, 2), kind)
    mirrored = images.flip(3)
    turned = images.rot90(1, (2, 3)) if h == w else mirrored
    shift = int(torch.randint(w // 4, w // 3 + 1, (1,), generator=generator))  # far enough to be two shapes
    partner = images.roll(1, 0).roll(shift if torch.rand(1, generator=generator) < 0.5 else -shift, 3)
    overlaid = torch.maximum(images, partner)
    top, bottom = images[:, :, :h // 2], images[:, :, h // 2:]
    left_top, right_top = top[..., :w // 2], top[..., w // 2:]
    left_bottom, right_bottom = bottom[..., :w // 2], bottom[..., w // 2:]
    shuffled = torch.cat([torch.cat([right_bottom, left_bottom], 3), torch.cat([right_top, left_top], 3)], 2)
    choice = kind.view(b, 1, 1, 1)
    return torch.where(choice == 0, mirrored, torch.where(choice == 1, turned,
                                                          torch.where(choice == 2, overlaid, shuffled)))
