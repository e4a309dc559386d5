"""Synthetic two-class radiograph-like images for tests, demos and benchmarks.

The classes differ only by a faint, zero-mean localized pattern: a small patch of fine
oriented stripes (a Gabor patch) at a random position and orientation inside a "lung" field.
Global brightness and contrast vary at random in both classes, so mean brightness carries no
signal. A model has to find the pattern to separate them.
"""

from __future__ import annotations

import numpy as np


def _smooth_field(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.standard_normal((scale, scale))
    # bilinear upsampling with numpy only
    xs = np.linspace(0, scale - 1, size)
    i0 = np.floor(xs).astype(int)
    i1 = np.minimum(i0 + 1, scale - 1)
    f = xs - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def chest_phantom(rng: np.random.Generator, size: int) -> np.ndarray:
    """A crude chest-like image in [0, 1]: bright mediastinum and ribs, darker lung fields."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.55 + 0.08 * _smooth_field(rng, size, 6)
    for cx in (0.3, 0.7):  # lungs: dark ellipses
        cx = cx + rng.uniform(-0.03, 0.03)
        lung = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        img[lung] -= 0.3
    ribs = 0.04 * (np.sin(2 * np.pi * (y * 9 + 0.4 * np.abs(x - 0.5))) > 0.6)
    img += ribs
    img += 0.02 * rng.standard_normal((size, size))
    return np.clip(img, 0.0, 1.0)


def gabor_patch(
    size: int, cy: float, cx: float, sigma: float, period: float, theta: float
) -> np.ndarray:
    """Fine stripes under a Gaussian envelope centred at (cy, cx), in pixel units; zero mean."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    envelope = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
    phase = 2 * np.pi * ((x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)) / period
    p = envelope * np.cos(phase)
    return p - p.mean()


def synthetic_image(
    rng: np.random.Generator, size: int, positive: bool, amplitude: float = 0.12
) -> np.ndarray:
    """One image in [0, 1]; ``positive`` ones carry the faint localized pattern."""
    img = chest_phantom(rng, size)
    if positive:
        side = rng.choice([0.3, 0.7])
        cy = rng.uniform(0.35, 0.65) * size
        cx = (side + rng.uniform(-0.08, 0.08)) * size
        theta = rng.uniform(0, np.pi)
        img = img + amplitude * gabor_patch(
            size, cy, cx, sigma=0.06 * size, period=0.05 * size, theta=theta
        )
    gain = rng.uniform(0.8, 1.2)
    offset = rng.uniform(-0.08, 0.08)
    return np.clip(img * gain + offset, 0.0, 1.0)


def synthetic_batch(
    n: int, size: int = 150, seed: int = 0, amplitude: float = 0.12
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, size, size) float32 in [0, 1] and balanced labels (n,) int64."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    images = np.stack([synthetic_image(rng, size, bool(lbl), amplitude) for lbl in labels])
    return images.astype(np.float32), labels.astype(np.int64)
