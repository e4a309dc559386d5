"""Box sums in torch: the CPU path's area resize, in one pass over the image, on the device.

The CPU path (``tasks.dicom.pixels.box_means``) averages each output pixel over a rectangle of
whole input pixels (``pixels.box_bounds``: Pillow's BOX rule, a pixel counts for the output
pixel its centre falls in), as exact integer sums divided once in float64, for the model input
and the thumbnail alike. Here the same exact sums come from running sums: one ``cumsum`` along
the rows of the full-resolution image (the only pass over it, shared by every output shape),
differences at the column edges of each shape's boxes, then a running sum down the (narrow)
result and differences at the row edges. Integer arithmetic throughout, so the sums are the
CPU path's exactly and so are the float64 means made from them.

A batch holds groups of same-sized images: (G, H, W) in, one (G, rows, cols) int64 tensor per
shape out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from tasks.dicom.pixels import box_bounds


@functools.lru_cache(maxsize=512)
def _edges(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For the boxes of ``in_size -> out_size``: the running-sum index of each box's last
    pixel, of the pixel before its first (clamped to 0), whether there is one, and the box's
    pixel count, on ``device``."""
    first, count = box_bounds(in_size, out_size)
    last = torch.as_tensor(np.asarray(first + count - 1), device=device)
    before = torch.as_tensor(np.maximum(np.asarray(first) - 1, 0), device=device)
    has_before = torch.as_tensor(np.asarray(first) > 0, device=device)
    n = torch.as_tensor(np.asarray(count, dtype=np.float64), device=device)
    return last, before, has_before, n


def _difference(running: torch.Tensor, dim: int, in_size: int, out_size: int) -> torch.Tensor:
    """Sums over each box along ``dim`` from a running sum along ``dim`` (int64)."""
    last, before, has_before, _ = _edges(in_size, out_size, running.device)
    total = running.index_select(dim, last).to(torch.int64)
    head = running.index_select(dim, before).to(torch.int64)
    shape = [1] * running.dim()
    shape[dim] = out_size
    return total - head * has_before.view(shape)


def box_sums(
    values: torch.Tensor, shapes: Sequence[tuple[int, int]], largest: int
) -> list[torch.Tensor]:
    """Exact sums over the boxes of each of ``shapes`` (rows, cols) of a (G, H, W) group of
    integer images whose magnitude is at most ``largest`` (it picks a running sum that cannot
    overflow); one int64 (G, rows, cols) tensor per shape."""
    if values.dim() != 3:
        raise ValueError(f"expected a (G, H, W) group of images, got shape {tuple(values.shape)}")
    _, height, width = values.shape
    exact32 = largest * width < 2**31
    along = torch.cumsum(values, dim=2, dtype=torch.int32 if exact32 else torch.int64)
    out = []
    for rows, cols in shapes:
        columns = _difference(along, 2, width, cols)  # (G, H, cols)
        down = torch.cumsum(columns, dim=1)
        out.append(_difference(down, 1, height, rows))
    return out


def box_counts(height: int, width: int, shape: tuple[int, int], device) -> torch.Tensor:
    """(rows, cols) float64 pixel counts of the boxes of ``shape`` (the means' divisors)."""
    rows, cols = shape
    row_n = _edges(height, rows, torch.device(device))[3]
    col_n = _edges(width, cols, torch.device(device))[3]
    return torch.outer(row_n, col_n)
