"""Area (box) resizing in torch that gives exactly what the CPU path's Pillow BOX resize gives.

The CPU path (``tasks.dicom.pixels``) resizes the windowed image, held as 16-bit levels
(``value * 65535``), with Pillow's BOX filter. Pillow does it in two passes, horizontal then
vertical, each rounded to an integer (``ImagingResample*_16bpc``); each output pixel of a pass
is the mean of the input pixels whose *centres* fall inside the output pixel's box (the box
filter is evaluated at pixel centres, so a pixel straddling the box edge counts fully or not
at all: this is not an exact area overlap, and ``adaptive_avg_pool2d`` picks other pixels).

:func:`box_bounds` evaluates Pillow's coefficient rule (double precision, the same operations)
for every output pixel; :func:`box_resize` then accumulates ``value * (1/n)`` over each box in
ascending order in float64, one gather per position in the box (at most ~14 for 2000 -> 150
px), and rounds half up, as Pillow's C loop does. The result is Pillow's to the bit (tested on
random 16-bit images of many shapes); an exact integer mean would differ by one level at ties,
where Pillow's double sum lands a hair below .5.

For a batch, all images of one shape are resized together (a (G, H, W) tensor): each step is
a handful of kernels for the whole group.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=256)
def box_bounds(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, count) of the input pixels averaged into each of ``out_size`` output pixels.

    Pillow's ``precompute_coeffs`` for the BOX filter over the whole image (box 0..in_size):
    ``center = (xx + 0.5) * scale``; candidate pixels ``[int(center - support + 0.5),
    int(center + support + 0.5))`` clipped to the image; weight 1 where
    ``-0.5 < (x - center + 0.5) / filterscale <= 0.5``; normalised by the number of ones.
    The pixels with weight 1 are contiguous, so a (first, count) pair describes each.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    ss = 1.0 / filterscale
    first = np.empty(out_size, dtype=np.int64)
    count = np.empty(out_size, dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        ones = [x for x in range(xmin, xmax) if -0.5 < (x - center + 0.5) * ss <= 0.5]
        if not ones:  # cannot happen for a box of at least one pixel; Pillow would write 0
            raise ValueError(f"no input pixel for output {xx} of {in_size} -> {out_size}")
        first[xx] = ones[0]
        count[xx] = len(ones)
    return first, count


@functools.lru_cache(maxsize=256)
def _pass_plan(in_size: int, out_size: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Per step j of a pass: the input index of each output's j-th pixel (clamped) and its
    weight (Pillow's ``1.0 / n``, or 0.0 past the end of the output's box), on ``device``."""
    first, count = box_bounds(in_size, out_size)
    weight = 1.0 / count.astype(np.float64)  # Pillow: k = w / ww with w = 1.0, ww = n
    steps = []
    for j in range(int(count.max())):
        index = torch.as_tensor(np.minimum(first + j, in_size - 1), device=device)
        k = torch.as_tensor(np.where(j < count, weight, 0.0), device=device)
        steps.append((index, k))
    return steps


def _pillow_pass(image: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One BOX pass along ``dim`` as Pillow's 16-bit resampler computes it: for each output,
    ``ss += value * k`` over its pixels in ascending order in double precision, then
    ``(int)(ss + 0.5)``. Returns float64 integers."""
    in_size = image.shape[dim]
    shape = [1] * image.dim()
    shape[dim] = out_size
    total = None
    for index, k in _pass_plan(in_size, out_size, image.device):
        # separate multiply and add kernels: no fused multiply-add, each step rounds as in C
        term = image.index_select(dim, index).to(torch.float64) * k.view(shape)
        total = term if total is None else total + term
    assert total is not None  # every pass has at least one step
    return torch.floor(total + 0.5)


def box_resize(levels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Pillow-BOX resize of a group of same-sized images to ``shape`` (rows, cols).

    ``levels``: (G, H, W) integer levels (at most 65535, as the CPU path's uint16 image).
    Returns (G, rows, cols) float64 integers: horizontal pass, then vertical, each rounded,
    as Pillow does.
    """
    if levels.dim() != 3:
        raise ValueError(f"expected a (G, H, W) group of images, got shape {tuple(levels.shape)}")
    rows, cols = shape
    return _pillow_pass(_pillow_pass(levels, 2, cols), 1, rows)


def pillow_box_reference(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The same resize in numpy, straight from :func:`box_bounds` (tests and checks)."""
    rows, cols = shape
    first, count = box_bounds(image.shape[1], cols)
    horizontal = np.empty((image.shape[0], cols), dtype=np.int64)
    for j in range(cols):
        s = image[:, first[j] : first[j] + count[j]].astype(np.int64).sum(axis=1)
        horizontal[:, j] = (2 * s + count[j]) // (2 * count[j])
    first, count = box_bounds(image.shape[0], rows)
    out = np.empty((rows, cols), dtype=np.int64)
    for i in range(rows):
        s = horizontal[first[i] : first[i] + count[i]].sum(axis=0)
        out[i] = (2 * s + count[i]) // (2 * count[i])
    return out
