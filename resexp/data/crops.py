"""The paper's ImageNet augmentation (§3.4): as batched tensor maths for the packed path
(resexp/data/packed.py), and as one draw per image for the class-folder path
(resexp/data/imagenet_folders.py), whose images are decoded in its workers or on the device.

Scale augmentation rescales an image so that its shorter side is L, uniform in [256, 480], and crops
224 x 224 from it: the crop's side is 224/L of the shorter side, between 0.47 and 0.875 of it. A packed
image is the central S x S square of an image whose shorter side was resized to S, so the same rule
draws a window whose side is that fraction of S, anywhere in the square, and resamples it to the
training resolution R = S x 224/256: the largest window (L = 256) maps pixel for pixel, every other one is
enlarged, so bilinear sampling needs no antialiasing. What the square gives up is the crops that reach
past it along the longer side (a quarter of a 4:3 image's width).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from resexp.data.loaders import WHOLE, Shard

# AlexNet's colour augmentation (Krizhevsky et al. 2012, cited in §3.4): the principal components of
# ImageNet's RGB pixel values (in [0, 1]), as published with fb.resnet.torch.
EIGENVALUES = (0.2175, 0.0188, 0.0045)
EIGENVECTORS = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))  # columns

# The columns of a window draw (draw_windows): the window's side and top-left corner as fractions of the
# image's side, whether it is mirrored, and the image's three colour-noise weights.
SIDE, TOP, LEFT, FLIP, ALPHA = 0, 1, 2, 3, slice(4, 7)
DRAWN = 7


@functools.cache
def scaled_components(device: torch.device) -> torch.Tensor:
    """The principal components (columns) times their eigenvalues, made once per device: not a copy to
    the device every training step."""
    return torch.tensor(EIGENVECTORS, device=device) * torch.tensor(EIGENVALUES, device=device)


def colour_shift(alpha: torch.Tensor) -> torch.Tensor:
    """(B, 3) noise weights to the (B, 3, 1, 1) shift of every pixel: the mix of the principal components,
    weighted by their eigenvalues."""
    return (alpha @ scaled_components(alpha.device).T.to(alpha.dtype))[:, :, None, None]


def lighting(x: torch.Tensor, std: float, generator: torch.Generator, shard: Shard = WHOLE) -> torch.Tensor:
    """Add to every pixel of each image the same random mix of the principal components, weighted by
    their eigenvalues and one N(0, std) draw per component and image (x: a `shard` of the global batch,
    whose draws are all made)."""
    alpha = shard.of(torch.randn((len(x) * shard.count, 3), generator=generator, device=x.device)) * std
    return x + colour_shift(alpha).to(x.dtype)


def crop_fractions(scale: tuple[int, int], crop: int) -> tuple[float, float]:
    """The smallest and largest side of a training crop as fractions of the image's shorter side."""
    return crop / scale[1], crop / scale[0]


def draw_windows(
    count: int, scale: tuple[int, int], crop: int, lighting_std: float, generator: torch.Generator, shard: Shard = WHOLE
) -> torch.Tensor:
    """`count` images' draws (count, DRAWN), of which the `shard`'s slice: L uniform in the integers of
    `scale` (torchvision's RandomResize), the window's place uniform, a mirror with probability 1/2, the
    colour noise N(0, lighting_std). All from `generator`, on its device, in one order: the stream resumes."""
    device = generator.device
    length = torch.randint(scale[0], scale[1] + 1, (count,), generator=generator, device=device)
    side = crop / length.float()
    top, left = torch.rand((2, count), generator=generator, device=device) * (1 - side)
    flip = torch.randint(0, 2, (count,), generator=generator, device=device).float()
    alpha = torch.randn((count, 3), generator=generator, device=device) * lighting_std
    return shard.of(torch.cat([torch.stack([side, top, left, flip], 1), alpha], 1))


def sample_windows(images: torch.Tensor, drawn: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's drawn window, mirrored where drawn, resampled bilinearly to `size` x `size`: floats in
    [0, 255] (B, 3, size, size). One affine grid and one grid_sample for the batch, no loop over images:
    a CUDA graph captures it."""
    x = images.to(drawn.dtype)
    side, top, left = drawn[:, SIDE], drawn[:, TOP], drawn[:, LEFT]
    mirror = 1 - 2 * drawn[:, FLIP]
    # grid_sample's coordinates run from -1 to 1 across the image's outer pixel edges (align_corners=False):
    # an output pixel's place maps to the window's, scaled by its side and centred on its centre
    zero = torch.zeros_like(side)
    theta = torch.stack(
        [torch.stack([side * mirror, zero, 2 * left + side - 1], 1), torch.stack([zero, side, 2 * top + side - 1], 1)],
        1,
    )
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def centre_window(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` x `size` window of square images, as torchvision's center_crop places it."""
    start = round((images.shape[-1] - size) / 2)
    return images[..., start : start + size, start : start + size]


def ten_windows(images: torch.Tensor, size: int) -> torch.Tensor:
    """§3.4's 10-crop testing on square images (B, 3, S, S): the four corners and the centre, and each of
    them mirrored (torchvision's ten_crop's ten views, the mirrored ones in another order); (B, 10, 3, size, size)."""
    last = images.shape[-1] - size
    corners = [images[..., y : y + size, x : x + size] for y, x in ((0, 0), (0, last), (last, 0), (last, last))]
    five = torch.stack([*corners, centre_window(images, size)], 1)
    return torch.cat([five, five.flip(-1)], 1)


# --- Full images (resexp/data/imagenet_folders.py): the same rule in whole pixels, as torchvision's
# RandomResize, RandomCrop and RandomHorizontalFlip draw it, so that the CPU path and the device path give
# the same crops


@dataclass(frozen=True)
class Crop:
    """One training image's draw: its shorter side resized to `length`, the `crop` x `crop` window at
    (`top`, `left`) of the resized image, mirrored where `flip`."""

    length: int
    top: int
    left: int
    flip: bool


def resized_size(height: int, width: int, length: int) -> tuple[int, int]:
    """The size of an image whose shorter side is resized to `length`, as torchvision's resize computes it
    (the longer side scaled and truncated)."""
    if height <= width:
        return length, int(length * width / height)
    return int(length * height / width), length


def draw_crop(height: int, width: int, scale: tuple[int, int], crop: int) -> Crop:
    """A training crop of a `height` x `width` image, from torch's global generator in torchvision's order
    (v2.RandomResize, v2.RandomCrop, v2.RandomHorizontalFlip): the caller seeds it with the image's seed."""
    length = int(torch.randint(scale[0], scale[1] + 1, ()))
    tall, wide = resized_size(height, width, length)
    top = int(torch.randint(0, tall - crop + 1, ())) if tall > crop else 0
    left = int(torch.randint(0, wide - crop + 1, ())) if wide > crop else 0
    return Crop(length, top, left, flip=bool(torch.rand(1) < 0.5))


def apply_crop(image: torch.Tensor, drawn: Crop, crop: int) -> torch.Tensor:
    """The drawn crop of a uint8 image (3, H, W), on whatever device it is: resized with antialiasing as
    torchvision's RandomResize does, cropped, mirrored."""
    window = TF.crop(TF.resize(image, [drawn.length], antialias=True), drawn.top, drawn.left, crop, crop)
    return TF.horizontal_flip(window) if drawn.flip else window
