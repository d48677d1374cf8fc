"""Writes blob_ct.nii.gz: a synthetic 40 x 64 x 64 CT-like volume (HU) for the app's browser test.

A body ellipse at 40 HU in air (-1000 HU), a bright ellipsoid (200 HU) in it, mild quantised noise,
spacing 0.8 x 0.8 x 2 mm and a non-zero origin, so that a label map's geometry can be checked.
Run from the repository root: python tests/data/make_blob_ct.py
"""

import numpy as np
import SimpleITK as sitk

SHAPE = (40, 64, 64)  # z, y, x


def blob_ct() -> sitk.Image:
    grid = np.indices(SHAPE, dtype=np.float32)
    body = ((grid[1] - 32) / 28) ** 2 + ((grid[2] - 32) / 30) ** 2 <= 1
    blob = ((grid[0] - 20) / 12) ** 2 + ((grid[1] - 26) / 10) ** 2 + ((grid[2] - 38) / 12) ** 2 <= 1
    noise = np.round(np.random.default_rng(0).normal(0, 8, SHAPE) / 4) * 4
    values = np.where(body, 40 + noise, -1000) + blob * 160
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((-25.0, -25.0, 10.0))
    return image


if __name__ == "__main__":
    sitk.WriteImage(blob_ct(), "tests/data/blob_ct.nii.gz", useCompression=True)
