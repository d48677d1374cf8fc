"""Box prompts from masks: the one place for box extraction and jitter.

Training jitters each side outward by ``randint(0, max_shift)`` (MedSAM, DB-SAM: 0-20 px);
evaluation uses a fixed outward shift (the authors' code: +9 px at 256 px) so that
results are reproducible. Shifts are stated at a reference ``resolution`` (the 256 px grid
the paper used) and scaled to the image's own size.
"""

from __future__ import annotations

import numpy as np


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight box ``[x0, y0, x1, y1]`` (inclusive pixel indices) of a 2D mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask is empty: no box can be derived from it")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def expand_box(
    box: np.ndarray, image_shape: tuple[int, int], shifts: np.ndarray, resolution: int | None = 256
) -> np.ndarray:
    """Move each side outward by ``shifts`` (x0, y0, x1, y1 order) and clip to the image.

    ``shifts`` are in pixels of a ``resolution``-sized image and scaled to ``image_shape``;
    ``resolution=None`` means they are already in the image's pixels.
    """
    height, width = image_shape
    shifts = np.asarray(shifts, dtype=np.float32)
    if resolution is not None:
        shifts = shifts * np.array([width, height, width, height], dtype=np.float32) / resolution
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float32)
    return np.array(
        [
            max(0.0, x0 - shifts[0]),
            max(0.0, y0 - shifts[1]),
            min(width - 1.0, x1 + shifts[2]),
            min(height - 1.0, y1 + shifts[3]),
        ],
        dtype=np.float32,
    )


def box_prompt(
    mask: np.ndarray,
    max_shift: int = 0,
    rng: np.random.Generator | None = None,
    fixed_shift: int | None = None,
    resolution: int | None = 256,
) -> np.ndarray:
    """The box prompt for ``mask``: tight box, then jittered (training) or shifted by a fixed amount (evaluation).

    Training: ``max_shift=20, rng=np.random.default_rng(seed)`` draws each side's shift from
    ``randint(0, max_shift)`` inclusive. Evaluation: ``fixed_shift=9``.
    """
    box = mask_to_box(mask)
    if fixed_shift is not None:
        if fixed_shift < 0:
            raise ValueError(f"fixed_shift must be >= 0, got {fixed_shift}")
        shifts = np.full(4, fixed_shift)
    elif max_shift > 0:
        if rng is None:
            raise ValueError("box jitter needs a seeded rng (np.random.default_rng(seed)) for reproducibility")
        shifts = rng.integers(0, max_shift + 1, size=4)
    elif max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    else:
        return box
    return expand_box(box, mask.shape, shifts, resolution)
