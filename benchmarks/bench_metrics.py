"""NSD speed and agreement: ``modeling_dbsam.metrics.normalized_surface_dice`` against MONAI's
``compute_surface_dice(..., use_subvoxels=True)`` (the same DeepMind surfel definition) on the same
arrays in one process, with interleaved repeats.

    pip install --no-deps monai   # the `bench` extra; --no-deps keeps the installed torch
    python benchmarks/bench_metrics.py [--repeats 3] [--tolerances 1 5]

Prints a Markdown table: min and median seconds of each, the speed-up (MONAI / ours, from the
minima) and the absolute difference of the two NSD values.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings

import numpy as np
import torch
from monai.metrics import compute_surface_dice

from modeling_dbsam.metrics import normalized_surface_dice

# (Z, Y, X) shape, spacing (z, y, x) in mm: a 256 px MedSAM-style volume and a full-resolution CT.
CASES = [((100, 256, 256), (2.5, 0.9, 0.9)), ((200, 512, 512), (1.25, 0.7, 0.7))]


def organ_pair(shape: tuple[int, int, int], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An organ-sized ellipsoid and a prediction that is shifted, slightly resized, with a bump and a dent."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    extent = [n * s for n, s in zip(shape, spacing)]

    def ellipsoid(center_frac, radii_frac):
        total = 0
        for axis, (g, s) in enumerate(zip(grid, spacing)):
            total = total + ((g * s - center_frac[axis] * extent[axis]) / (radii_frac[axis] * extent[axis])) ** 2
        return total <= 1

    gt = ellipsoid((0.5, 0.5, 0.5), (0.35, 0.3, 0.25))
    pred = ellipsoid((0.51, 0.505, 0.49), (0.34, 0.31, 0.25))
    pred |= ellipsoid((0.5, 0.22, 0.5), (0.1, 0.06, 0.08))  # bump over the gt boundary
    pred &= ~ellipsoid((0.3, 0.5, 0.72), (0.08, 0.08, 0.06))  # dent
    return pred, gt


def monai_nsd(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(
            torch.from_numpy(pred)[None, None],
            torch.from_numpy(gt)[None, None],
            [tolerance],
            spacing=spacing,
            use_subvoxels=True,
        )
    return float(value.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1.0, 5.0], help="NSD tolerances in mm")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, {args.repeats} interleaved repeats")
    print()
    print(
        "| shape (z, y, x) | spacing (mm) | tolerance (mm) | ours min / median (s) | MONAI min / median (s) "
        "| speed-up | NSD ours | abs(ours - MONAI) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    normalized_surface_dice(*organ_pair((8, 16, 16), (1.0, 1.0, 1.0)), (1.0, 1.0, 1.0), 1.0)  # build the tables once
    for (shape, spacing), tolerance in itertools.product(CASES, args.tolerances):
        pred, gt = organ_pair(shape, spacing)
        times = {"ours": [], "monai": []}
        values = {}
        for _ in range(args.repeats):
            for name, function in (("ours", normalized_surface_dice), ("monai", monai_nsd)):
                start = time.perf_counter()
                values[name] = function(pred, gt, spacing, tolerance)
                times[name].append(time.perf_counter() - start)
        ours, monai = times["ours"], times["monai"]
        print(
            f"| {shape} | {spacing} | {tolerance:g} | {min(ours):.3f} / {statistics.median(ours):.3f} "
            f"| {min(monai):.3f} / {statistics.median(monai):.3f} | {min(monai) / min(ours):.1f}x "
            f"| {values['ours']:.6f} | {abs(values['ours'] - values['monai']):.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
