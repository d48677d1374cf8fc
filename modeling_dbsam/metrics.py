"""Dice similarity coefficient (DSC) and normalized surface Dice (NSD) for 2D and 3D binary masks.

NSD follows the DeepMind ``surface-distance`` definition (Nikolov et al., 2021) that MedSAM and
DB-SAM report: the surface is the marching-squares (2D) or marching-cubes (3D) surface of each
mask, cut into one surface element ("surfel") per 2x2 (2x2x2) cell of neighbouring pixels; each
surfel is weighted by its length (area) in millimetres, computed from the spacing; and

    NSD = (area of gt surface within ``tolerance`` of pred surface + area of pred surface within
           ``tolerance`` of gt surface) / (total gt area + total pred area).

Spacing is always given in ARRAY AXIS ORDER: ``(z, y, x)`` for a ``(Z, Y, X)`` volume, ``(y, x)``
for an image. SimpleITK's ``GetSpacing()`` is ``(x, y, z)``: reverse it first (``io.MedicalImage.spacing``
already does). Getting the order wrong silently changes the answer for anisotropic data.

Only the boundary band is processed: both masks are cropped to the bounding box of their union,
padded by one voxel (so that every surfel's 2x2x2 cell is inside) plus the tolerance in voxels
per axis (so that every neighbour within tolerance is inside); tolerance checks then look the
other surface up at the few grid offsets within tolerance, nearest first, instead of running a
distance transform over the volume. ``scipy.ndimage.distance_transform_edt(sampling=spacing)``
of the crop takes over when it is cheaper (tolerances spanning many voxels) and gives the full
distances of :func:`compute_surface_distances`; both paths are exact and give the same answer.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

EVALUATE_METRIC_PATH = str(Path(__file__).parent / "metrics_hub" / "dbsam_segmentation")
"""Folder of the ``evaluate`` metric module: ``evaluate.load(EVALUATE_METRIC_PATH)`` works offline."""

# Tolerance checks look the other surface up at each grid offset within tolerance, nearest first,
# dropping surfels as they match. When the look-ups left (surfels x offsets) would cost more than
# an exact distance transform of the crop (about this many look-ups per voxel), the transform
# answers for the surfels left. Offsets are not enumerated beyond MAX_OFFSET_BOX candidates.
EDT_LOOKUPS_PER_VOXEL = 100
MAX_OFFSET_BOX = 1 << 21


@dataclass
class SurfaceDistances:
    """Each surfel's distance (mm) to the other mask's surface, and each surfel's length or area."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    surfel_areas_gt: np.ndarray
    surfel_areas_pred: np.ndarray


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_mask(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be a boolean or 0/1 array, got dtype {array.dtype}")
    valid = (array == 0) | (array == 1)
    if not valid.all():
        bad = array[~valid].flat[0]
        raise ValueError(
            f"{name} has values other than 0 and 1 (e.g. {bad}); pass a boolean mask of one object, "
            "e.g. labels == label_value"
        )
    return array.astype(bool)


def _check_masks(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_mask("pred", pred), _as_mask("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D (y, x) or 3D (z, y, x), got {pred.ndim}D shape {pred.shape}")
    return pred, gt


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(values) != ndim:
        raise ValueError(
            f"spacing {values} has {len(values)} values but the masks are {ndim}D; give one spacing per array axis, "
            "in ARRAY AXIS ORDER ((z, y, x) for a (Z, Y, X) volume)"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and positive, got {values}")
    return values


def _check_tolerance(tolerance: float) -> float:
    tolerance = float(tolerance)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (mm), got {tolerance}")
    return tolerance


# ---------------------------------------------------------------------------------------------
# Surfel measure tables
# ---------------------------------------------------------------------------------------------


def _corner(bit: int, ndim: int) -> tuple[int, ...]:
    """Cell corner of a neighbour-code bit: bit ``sum_k o_k * 2**k`` is the voxel at offset ``o``."""
    return tuple((bit >> axis) & 1 for axis in range(ndim))


_SQUARE = ((0, 0), (1, 0), (1, 1), (0, 1))  # corners of a unit square in cyclic order


def _square_faces(ndim: int) -> list[list[tuple[int, ...]]]:
    """The cell's square faces, each as its 4 corners in cyclic order (2D: the cell itself)."""
    if ndim == 2:
        return [list(_SQUARE)]
    faces = []
    for normal_axis, side in itertools.product(range(3), (0, 1)):
        first, second = (axis for axis in range(3) if axis != normal_axis)
        corners = []
        for a, b in _SQUARE:
            corner = [side] * 3
            corner[first], corner[second] = a, b
            corners.append(tuple(corner))
        faces.append(corners)
    return faces


def _face_segments(face: list[tuple[int, ...]], inside: set[tuple[int, ...]]) -> list[tuple[tuple, tuple]]:
    """Iso-contour segments on one square face, between midpoints of edges that change sign.

    A saddle face (diagonal corners inside) separates the inside corners, as the classic
    marching-cubes table does for the minority class.
    """
    flags = [corner in inside for corner in face]

    def midpoint(k: int) -> tuple[float, ...]:
        return tuple((a + b) / 2 for a, b in zip(face[k], face[(k + 1) % 4]))

    cuts = [k for k in range(4) if flags[k] != flags[(k + 1) % 4]]
    if len(cuts) == 2:
        return [(midpoint(cuts[0]), midpoint(cuts[1]))]
    if len(cuts) == 4:
        return [(midpoint(k - 1), midpoint(k)) for k in range(4) if flags[k]]
    return []


def _chain_loops(segments: list[tuple[tuple, tuple]]) -> list[list[tuple]]:
    """Join face segments that share end points into closed polygons."""
    remaining = list(segments)
    loops = []
    while remaining:
        start, end = remaining.pop()
        loop = [start, end]
        while True:
            index = next(i for i, seg in enumerate(remaining) if loop[-1] in seg)
            seg = remaining.pop(index)
            nxt = seg[1] if seg[0] == loop[-1] else seg[0]
            if nxt == loop[0]:
                break
            loop.append(nxt)
        loops.append(loop)
    return loops


@functools.cache
def _triangulations(vertices: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
    """All triangulations of a polygon (by vertex index), as lists of triangles."""
    if len(vertices) < 3:
        return [[]]
    first, last = vertices[0], vertices[-1]
    result = []
    for k in range(1, len(vertices) - 1):
        for left in _triangulations(vertices[: k + 1]):
            for right in _triangulations(vertices[k:]):
                result.append(left + right + [(first, vertices[k], last)])
    return result


def _polygon_area_vectors(loop: list[tuple]) -> list[np.ndarray]:
    """Area vectors (normal x area, voxel units) of the polygon's triangles.

    Planar polygons give the same total for any triangulation; the non-planar pentagons and
    hexagons of marching cubes take the triangulation of largest area, which is the one of
    the classic table and of DeepMind's ``surface-distance`` (checked against it in the tests).
    """
    points = np.asarray(loop, dtype=np.float64)
    triangulations = _triangulations(tuple(range(len(points))))
    triangles = sorted({triangle for triangulation in triangulations for triangle in triangulation})
    a, b, c = (points[list(index)] for index in zip(*triangles))
    vectors = dict(zip(triangles, np.cross(b - a, c - a) / 2))
    areas = {triangle: float(np.linalg.norm(vector)) for triangle, vector in vectors.items()}
    best = max(triangulations, key=lambda triangulation: round(sum(areas[t] for t in triangulation), 12))
    return [vectors[triangle] for triangle in best]


@functools.cache
def _surfel_normals(ndim: int) -> np.ndarray:
    """Per neighbour code, the normal vectors of its surfels scaled to their length/area at unit spacing.

    Shape ``(2**2**ndim, max_surfels, ndim)``, zero-padded. At spacing ``s`` a surfel with normal
    ``n`` measures ``|| n * prod(s) / s ||`` (a segment in 2D, a triangle in 3D).
    """
    n_corners = 2**ndim
    per_code = []
    for code in range(2**n_corners):
        # Complements share the surface; using the code with fewer inside corners makes saddle faces
        # separate the minority class.
        minority = code if bin(code).count("1") <= n_corners // 2 else (2**n_corners - 1) ^ code
        inside = {_corner(bit, ndim) for bit in range(n_corners) if minority >> bit & 1}
        segments = [seg for face in _square_faces(ndim) for seg in _face_segments(face, inside)]
        if ndim == 2:
            normals = [np.array([b[1] - a[1], a[0] - b[0]], dtype=np.float64) for a, b in segments]
        else:
            normals = [v for loop in _chain_loops(segments) for v in _polygon_area_vectors(loop)]
        per_code.append(normals)
    table = np.zeros((len(per_code), max(len(n) for n in per_code), ndim))
    for code, normals in enumerate(per_code):
        for slot, normal in enumerate(normals):
            table[code, slot] = normal
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=64)
def _surfel_measure_table(spacing: tuple[float, ...]) -> np.ndarray:
    scale = np.prod(spacing) / np.asarray(spacing)
    table = np.linalg.norm(_surfel_normals(len(spacing)) * scale, axis=-1).sum(axis=-1)
    table.setflags(write=False)
    return table


def surfel_measure_table(spacing: Sequence[float]) -> np.ndarray:
    """Length (2D, mm) or area (3D, mm^2) of the surface inside a cell, per neighbour code.

    The code of a cell is ``sum_o mask[i + o] << sum_k o_k * 2**k`` over its ``2**ndim`` corners ``o``.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 values, got {spacing}")
    return _surfel_measure_table(_check_spacing(spacing, len(spacing)))


# ---------------------------------------------------------------------------------------------
# Surfaces on the cropped grid
# ---------------------------------------------------------------------------------------------


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of ``pred | gt``, or None when both are empty."""
    box = []
    for axis in range(pred.ndim):
        others = tuple(a for a in range(pred.ndim) if a != axis)
        present = np.flatnonzero(pred.any(axis=others) | gt.any(axis=others))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _crop_padded(mask: np.ndarray, box: tuple[slice, ...], pad: Sequence[int]) -> np.ndarray:
    """``mask[box]`` as uint8 with ``pad[k]`` zero planes on both sides of axis ``k``."""
    inner = mask[box]
    out = np.zeros(tuple(n + 2 * p for n, p in zip(inner.shape, pad)), dtype=np.uint8)
    out[tuple(slice(p, p + n) for n, p in zip(inner.shape, pad))] = inner
    return out


def _neighbour_codes(padded: np.ndarray) -> np.ndarray:
    """Code of every 2x2(x2) cell; one axis at a time, each doubling the bits (grid shrinks by 1 per axis)."""
    codes = padded
    for axis in range(padded.ndim):
        low = tuple(slice(None, -1) if a == axis else slice(None) for a in range(padded.ndim))
        high = tuple(slice(1, None) if a == axis else slice(None) for a in range(padded.ndim))
        codes = codes[low] | (codes[high] << (1 << axis))
    return codes


@dataclass
class _Surface:
    border: np.ndarray  # bool on the cell grid: cells the surface passes through
    index: np.ndarray  # flat indices of the border cells
    areas: np.ndarray  # their surfel lengths/areas (mm or mm^2)


def _surface(padded: np.ndarray, table: np.ndarray) -> _Surface:
    codes = _neighbour_codes(padded)
    full = len(table) - 1
    border = (codes != 0) & (codes != full)
    index = np.flatnonzero(border)
    return _Surface(border=border, index=index, areas=table[codes.ravel()[index]])


def _surfaces(pred, gt, spacing, margin: Sequence[int]) -> tuple[_Surface, _Surface] | None:
    box = _union_box(pred, gt)
    if box is None:
        return None
    pad = [1 + m for m in margin]
    table = _surfel_measure_table(spacing)
    return _surface(_crop_padded(pred, box, pad), table), _surface(_crop_padded(gt, box, pad), table)


def _distances_to(other: _Surface, index: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Exact distance (mm) from the cells at flat ``index`` to the nearest surfel of ``other``."""
    if other.index.size == 0:
        return np.full(index.size, np.inf)
    distance_map = ndimage.distance_transform_edt(~other.border, sampling=spacing)
    return distance_map.ravel()[index]


# ---------------------------------------------------------------------------------------------
# Tolerance offsets
# ---------------------------------------------------------------------------------------------


def _offset_lengths(offsets: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Lengths of integer grid offsets in mm, with the same floating-point operations as the distance transform."""
    scaled = offsets.astype(np.float64) * np.asarray(spacing)
    return np.sqrt(np.add.reduce(scaled * scaled, axis=1))


@functools.lru_cache(maxsize=64)
def _tolerance_offsets(spacing: tuple[float, ...], tolerance: float) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Integer grid offsets no longer than ``tolerance`` mm, nearest first, and the reach per axis in voxels.

    None when the tolerance spans so many voxels that enumerating offsets does not pay off.
    """
    reach = tuple(int(math.floor(tolerance / s)) for s in spacing)
    if math.prod(2 * r + 1 for r in reach) > MAX_OFFSET_BOX:
        return None
    axes = np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij")
    grid = np.stack([axis.ravel() for axis in axes], axis=1).astype(np.int64)
    lengths = _offset_lengths(grid, spacing)
    keep = lengths <= tolerance
    order = np.argsort(lengths[keep], kind="stable")
    return grid[keep][order], reach


def _unmatched_area(
    surface: _Surface, other: _Surface, offsets: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> float:
    """Area of ``surface`` farther than ``tolerance`` from every surfel of ``other`` (exact either way)."""
    strides = np.array(other.border.strides, dtype=np.int64) // other.border.itemsize
    steps = offsets @ strides
    other_flat = other.border.ravel()
    index, areas = surface.index, surface.areas
    transform_cost = EDT_LOOKUPS_PER_VOXEL * other.border.size
    for done, step in enumerate(steps):
        if index.size == 0:
            return 0.0
        if index.size * (len(steps) - done) > transform_cost:
            return float(areas[_distances_to(other, index, spacing) > tolerance].sum())
        missed = ~other_flat[index + step]
        index, areas = index[missed], areas[missed]
    return float(areas.sum())


# ---------------------------------------------------------------------------------------------
# Public metrics
# ---------------------------------------------------------------------------------------------


def dice_score(pred, gt) -> float:
    """Dice similarity coefficient ``2 |P & G| / (|P| + |G|)``; 1 when both masks are empty."""
    pred, gt = _check_masks(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / int(total)


def compute_surface_distances(pred, gt, spacing: Sequence[float]) -> SurfaceDistances:
    """Distances (mm) between the two masks' surfaces, both ways, with each surfel's length/area.

    ``spacing`` is in ARRAY AXIS ORDER: ``(z, y, x)`` for a ``(Z, Y, X)`` volume, ``(y, x)`` for an
    image. A mask without surface gives ``inf`` distances from the other one. Distances come from
    one ``scipy.ndimage.distance_transform_edt`` per direction over the union's bounding box; use
    :func:`normalized_surface_dice` when only the tolerance test is needed: it is much faster.
    """
    pred, gt = _check_masks(pred, gt)
    spacing = _check_spacing(spacing, pred.ndim)
    surfaces = _surfaces(pred, gt, spacing, margin=[0] * pred.ndim)
    if surfaces is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    pred_surface, gt_surface = surfaces
    return SurfaceDistances(
        distances_gt_to_pred=_distances_to(pred_surface, gt_surface.index, spacing),
        distances_pred_to_gt=_distances_to(gt_surface, pred_surface.index, spacing),
        surfel_areas_gt=gt_surface.areas,
        surfel_areas_pred=pred_surface.areas,
    )


def surface_dice_from_distances(distances: SurfaceDistances, tolerance: float) -> float:
    """NSD from precomputed :class:`SurfaceDistances`; 1 when both surfaces are empty, 0 when one is."""
    tolerance = _check_tolerance(tolerance)
    total = distances.surfel_areas_gt.sum() + distances.surfel_areas_pred.sum()
    if distances.surfel_areas_gt.size == 0 or distances.surfel_areas_pred.size == 0:
        return 1.0 if total == 0 else 0.0
    overlap = (
        distances.surfel_areas_gt[distances.distances_gt_to_pred <= tolerance].sum()
        + distances.surfel_areas_pred[distances.distances_pred_to_gt <= tolerance].sum()
    )
    return float(overlap / total)


def normalized_surface_dice(pred, gt, spacing: Sequence[float], tolerance: float) -> float:
    """Normalized surface Dice at ``tolerance`` mm (DeepMind definition, surfels weighted by area).

    Args:
        pred, gt: boolean (or 0/1) masks of the same 2D ``(y, x)`` or 3D ``(z, y, x)`` shape.
        spacing: voxel size in mm in ARRAY AXIS ORDER, one value per axis: ``(z, y, x)`` for a
            ``(Z, Y, X)`` volume, ``(y, x)`` for an image. (SimpleITK's ``GetSpacing()`` is reversed.)
            Use ones to measure in voxels, as the paper protocol does.
        tolerance: distance (mm) up to which surface points count as matched.

    Returns 1 when both masks are empty and 0 when exactly one is.
    """
    pred, gt = _check_masks(pred, gt)
    spacing = _check_spacing(spacing, pred.ndim)
    tolerance = _check_tolerance(tolerance)
    pred_any, gt_any = pred.any(), gt.any()
    if not (pred_any and gt_any):
        return 1.0 if pred_any == gt_any else 0.0
    lookup = _tolerance_offsets(spacing, tolerance)
    if lookup is None:
        return surface_dice_from_distances(compute_surface_distances(pred, gt, spacing), tolerance)
    offsets, reach = lookup
    pred_surface, gt_surface = _surfaces(pred, gt, spacing, margin=reach)
    unmatched = _unmatched_area(gt_surface, pred_surface, offsets, spacing, tolerance)
    unmatched += _unmatched_area(pred_surface, gt_surface, offsets, spacing, tolerance)
    total = float(gt_surface.areas.sum() + pred_surface.areas.sum())
    return (total - unmatched) / total
