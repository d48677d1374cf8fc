"""DSC and NSD: hand-computed answers, an independent brute force, invariants, the spacing-order trap, bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from modeling_dbsam import metrics
from modeling_dbsam.metrics import (
    EVALUATE_METRIC_PATH,
    compute_surface_distances,
    dice_score,
    normalized_surface_dice,
    surface_dice_from_distances,
    surfel_measure_table,
)

ANISO = (2.5, 0.8, 0.6)


def _code(corners: list[tuple[int, ...]]) -> int:
    """Neighbour code of a cell whose listed corners are inside (bit sum_k o_k 2**k, as documented)."""
    return sum(1 << sum(o << k for k, o in enumerate(corner)) for corner in corners)


def _cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def _ball(shape, center, radius_mm, spacing) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing)) <= radius_mm**2


def _blob(rng, shape, sigma=1.5, level=0.1) -> np.ndarray:
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > level


# ---------------------------------------------------------------------------------------------
# Independent references written here
# ---------------------------------------------------------------------------------------------


def _brute_force_nsd(pred, gt, spacing, tolerance) -> float:
    """DeepMind's recipe without cropping or tricks: full-volume codes by correlation, all-pairs distances."""
    ndim = pred.ndim
    weights = np.zeros((2,) * ndim, dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=ndim):
        weights[corner] = 1 << sum(o << k for k, o in enumerate(corner))
    table = surfel_measure_table(spacing)

    def surfels(mask):
        padded = np.pad(mask.astype(np.int64), 1)
        codes = ndimage.correlate(padded, weights, mode="constant", cval=0, origin=(-1,) * ndim)[
            tuple(slice(0, n + 1) for n in mask.shape)
        ]
        border = (codes != 0) & (codes != len(table) - 1)
        return np.argwhere(border), table[codes[border]]

    (points_pred, areas_pred), (points_gt, areas_gt) = surfels(pred), surfels(gt)
    if len(areas_pred) == 0 or len(areas_gt) == 0:
        return float(len(areas_pred) == len(areas_gt))
    # All pairs; squared mm summed axis by axis from integer differences, like a distance transform does.
    squared = sum(((points_gt[:, None, k] - points_pred[None, :, k]) * spacing[k]) ** 2 for k in range(ndim))
    distances = np.sqrt(squared)
    matched = areas_gt[distances.min(axis=1) <= tolerance].sum() + areas_pred[distances.min(axis=0) <= tolerance].sum()
    return matched / (areas_gt.sum() + areas_pred.sum())


def _boundary_voxel_nsd(pred, gt, spacing, tolerance) -> float:
    """A simpler, different definition: boundary voxels (mask minus its erosion), equal weights, centre distances."""
    points = []
    for mask in (pred, gt):
        boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
        points.append(np.argwhere(boundary) * np.asarray(spacing))
    distances = cdist(points[1], points[0])
    matched = (distances.min(axis=1) <= tolerance).sum() + (distances.min(axis=0) <= tolerance).sum()
    return matched / (len(points[0]) + len(points[1]))


# ---------------------------------------------------------------------------------------------
# Surfel measures, derived by hand
# ---------------------------------------------------------------------------------------------


def test_3d_surfel_areas_match_hand_geometry():
    s0, s1, s2 = ANISO
    table = surfel_measure_table(ANISO)
    corner_triangle = math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8
    assert table[_code([(0, 0, 0)])] == pytest.approx(corner_triangle)
    assert table[_code([(1, 1, 1)])] == pytest.approx(corner_triangle)
    # Two corners along axis 0: a rectangle s0 long, across the half-diagonal of the (1, 2) face.
    assert table[_code([(0, 0, 0), (1, 0, 0)])] == pytest.approx(s0 * math.hypot(s1, s2) / 2)
    assert table[_code([(0, 1, 0), (0, 1, 1)])] == pytest.approx(s2 * math.hypot(s0, s1) / 2)
    # Four corners of one face: a flat square parallel to it.
    assert table[_code([(0, a, b) for a in (0, 1) for b in (0, 1)])] == pytest.approx(s1 * s2)
    assert table[_code([(a, b, 1) for a in (0, 1) for b in (0, 1)])] == pytest.approx(s0 * s1)
    # Two opposite corners: two separate corner triangles.
    assert table[_code([(0, 0, 0), (1, 1, 1)])] == pytest.approx(2 * corner_triangle)
    assert table[0] == table[255] == 0
    # A surface is the same seen from either side.
    np.testing.assert_allclose(table, table[::-1], rtol=1e-12)


def test_2d_surfel_lengths_match_hand_geometry():
    s0, s1 = 2.0, 0.5
    table = surfel_measure_table((s0, s1))
    half_diagonal = math.hypot(s0, s1) / 2
    assert table[_code([(0, 0)])] == pytest.approx(half_diagonal)
    assert table[_code([(0, 0), (1, 0)])] == pytest.approx(s0)  # edge along axis 0
    assert table[_code([(0, 0), (0, 1)])] == pytest.approx(s1)  # edge along axis 1
    assert table[_code([(0, 0), (1, 1)])] == pytest.approx(2 * half_diagonal)  # saddle
    assert table[_code([(0, 0), (1, 0), (0, 1)])] == pytest.approx(half_diagonal)
    assert table[0] == table[15] == 0


def test_box_surface_area_is_the_closed_form():
    """A box of n0 x n1 x n2 voxels: flat faces between voxel centres, chamfered edges, cut corners."""
    n, s = (5, 7, 4), ANISO
    mask = _cube((9, 11, 8), (2, 1, 3), n)
    areas = compute_surface_distances(mask, mask, s).surfel_areas_gt
    faces = 2 * sum((n[a] - 1) * (n[b] - 1) * s[a] * s[b] for a, b in ((1, 2), (0, 2), (0, 1)))
    edges = 4 * sum((n[k] - 1) * s[k] * math.hypot(*(s[j] for j in range(3) if j != k)) / 2 for k in range(3))
    corners = math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2)  # 8 x 1/8
    assert areas.sum() == pytest.approx(faces + edges + corners, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Analytic NSD and DSC
# ---------------------------------------------------------------------------------------------


def _shifted_cube_nsd(n: int, s: tuple[float, float, float]) -> float:
    """Cube of n^3 voxels shifted one voxel along axis 0, s0 > 1 >= s1 = s2, tolerance 1 (hand derivation).

    Every side-face surfel of one cube lies on the other's surface (distance 0). Unmatched: the whole
    bottom cap layer (distance s0) and the top cap's interior except its outer ring (distance 2 s1 or s0).
    """
    s0, s1, s2 = s
    corner = math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8
    faces = 2 * (n - 1) ** 2 * (s1 * s2 + s0 * s2 + s0 * s1)
    edges = 4 * (n - 1) * (s0 * math.hypot(s1, s2) + s1 * math.hypot(s0, s2) + s2 * math.hypot(s0, s1)) / 2
    total = faces + edges + 8 * corner
    bottom_cap = (n - 1) ** 2 * s1 * s2 + (n - 1) * (s1 * math.hypot(s0, s2) + s2 * math.hypot(s0, s1)) + 4 * corner
    top_cap_inside_ring = (n - 3) ** 2 * s1 * s2
    return 1 - (bottom_cap + top_cap_inside_ring) / total


def test_cube_shifted_one_voxel_under_anisotropic_spacing():
    n, spacing = 6, (2.5, 0.8, 0.8)
    gt = _cube((10, 10, 10), (2, 2, 2), (n, n, n))
    pred = np.roll(gt, 1, axis=0)
    assert dice_score(pred, gt) == pytest.approx((n - 1) / n)
    assert normalized_surface_dice(pred, gt, spacing, 1.0) == pytest.approx(_shifted_cube_nsd(n, spacing), rel=1e-12)
    assert normalized_surface_dice(pred, gt, spacing, 2.5) == 1.0  # every surfel within one slice


def test_spacing_order_trap():
    """The same arrays with x and z spacing swapped: different answers, so the order matters and is checked."""
    n = 6
    gt = _cube((10, 10, 10), (2, 2, 2), (n, n, n))
    pred = np.roll(gt, 1, axis=0)  # shifted along z (axis 0)
    zyx, xyz = (2.5, 0.8, 0.8), (0.8, 0.8, 2.5)
    assert normalized_surface_dice(pred, gt, zyx, 1.0) == pytest.approx(_shifted_cube_nsd(n, zyx))
    assert normalized_surface_dice(pred, gt, xyz, 1.0) == 1.0  # a 0.8 mm shift is within 1 mm
    with pytest.raises(ValueError, match="ARRAY AXIS ORDER"):
        normalized_surface_dice(pred, gt, (0.8, 0.8), 1.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_single_voxel_objects(ndim):
    spacing = ANISO[:ndim]
    gt = np.zeros((5,) * ndim, bool)
    gt[(2,) * ndim] = True
    neighbour = np.roll(gt, 1, axis=0)
    assert dice_score(gt, gt) == normalized_surface_dice(gt, gt, spacing, 0.0) == 1.0
    assert dice_score(neighbour, gt) == 0.0
    # Half of each voxel's surfels (the cells on the shared face plane) coincide; the rest are s0 away.
    assert normalized_surface_dice(neighbour, gt, spacing, 0.5 * spacing[0]) == pytest.approx(0.5)
    assert normalized_surface_dice(neighbour, gt, spacing, spacing[0]) == 1.0


@pytest.mark.parametrize(
    ("shape", "spacing", "center"),
    [((48, 48), (0.7, 1.1), (24, 24)), ((21, 40, 40), (2.5, 0.8, 0.8), (10, 20, 20))],
)
def test_concentric_balls_at_known_distance(shape, spacing, center):
    """Radii 6 mm apart: no surface point within 2 mm of the other, all within 10 mm, for any definition."""
    inner, outer = _ball(shape, center, 7.0, spacing), _ball(shape, center, 13.0, spacing)
    assert dice_score(inner, outer) == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))
    for tolerance, expected in ((2.0, 0.0), (10.0, 1.0)):
        assert normalized_surface_dice(inner, outer, spacing, tolerance) == expected
        assert _boundary_voxel_nsd(inner, outer, spacing, tolerance) == expected
        assert _brute_force_nsd(inner, outer, spacing, tolerance) == expected


# ---------------------------------------------------------------------------------------------
# Agreement with the brute force, invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_brute_force_on_random_shapes(ndim):
    rng = np.random.default_rng(ndim)
    shape = (40, 36) if ndim == 2 else (12, 16, 14)
    for trial in range(6):
        spacing = tuple(rng.uniform(0.4, 3.0, ndim))
        gt, pred = _blob(rng, shape), _blob(rng, shape)  # blobs touch the array border
        # Tolerances on both sides of and exactly at grid distances (the <= boundary).
        for tolerance in (0.0, spacing[0], math.hypot(spacing[0], spacing[1]), rng.uniform(0, 5)):
            expected = _brute_force_nsd(pred, gt, spacing, tolerance)
            assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(expected, abs=1e-12), trial
            distances = compute_surface_distances(pred, gt, spacing)
            assert surface_dice_from_distances(distances, tolerance) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("tolerance", "lookups_per_voxel"),
    [(3.0, None), (9.0, None), (3.0, 0), (150.0, None)],
    ids=["offsets", "many-offsets", "switch-to-transform", "transform-only"],
)
def test_every_tolerance_path_agrees_with_brute_force(monkeypatch, tolerance, lookups_per_voxel):
    """Offset look-ups, a switch to the distance transform midway, and the transform alone give one answer."""
    if lookups_per_voxel is not None:
        monkeypatch.setattr(metrics, "EDT_LOOKUPS_PER_VOXEL", lookups_per_voxel)
    rng = np.random.default_rng(7)
    spacing = (1.0, 1.2, 0.9)
    gt, pred = _blob(rng, (14, 14, 14)), np.roll(_blob(rng, (14, 14, 14)), 5, axis=2)
    expected = _brute_force_nsd(pred, gt, spacing, tolerance)
    assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected <= 1.0


def test_symmetry_and_invariance_to_empty_padding():
    rng = np.random.default_rng(3)
    gt, pred = _blob(rng, (10, 20, 18)), _blob(rng, (10, 20, 18))
    spacing, tolerance = (2.0, 0.9, 0.7), 1.5
    nsd, dsc = normalized_surface_dice(pred, gt, spacing, tolerance), dice_score(pred, gt)
    assert normalized_surface_dice(gt, pred, spacing, tolerance) == pytest.approx(nsd, abs=1e-12)
    assert dice_score(gt, pred) == dsc
    pad = ((3, 0), (0, 5), (7, 2))
    padded_gt, padded_pred = np.pad(gt, pad), np.pad(pred, pad)
    assert normalized_surface_dice(padded_pred, padded_gt, spacing, tolerance) == pytest.approx(nsd, abs=1e-12)
    assert dice_score(padded_pred, padded_gt) == dsc
    assert 0.0 < nsd < 1.0 and 0.0 < dsc < 1.0


def test_matches_monai_subvoxel_surface_dice():
    """MONAI ports DeepMind's table: same values on random anisotropic shapes (runs where MONAI is installed)."""
    pytest.importorskip("monai")
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(11)
    for ndim, shape in ((2, (50, 44)), (3, (14, 18, 16))):
        for _ in range(4):
            spacing, tolerance = tuple(rng.uniform(0.3, 3.0, ndim)), float(rng.uniform(0.5, 4.0))
            gt, pred = _blob(rng, shape), _blob(rng, shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = compute_surface_dice(
                    torch.from_numpy(pred)[None, None],
                    torch.from_numpy(gt)[None, None],
                    [tolerance],
                    spacing=spacing,
                    use_subvoxels=True,
                ).item()
            assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Empty masks and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_masks_without_warnings(ndim):
    empty = np.zeros((6,) * ndim, bool)
    full = _cube((6,) * ndim, (1,) * ndim, (3,) * ndim)
    spacing = ANISO[:ndim]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dice_score(empty, empty) == normalized_surface_dice(empty, empty, spacing, 1.0) == 1.0
        assert dice_score(full, empty) == normalized_surface_dice(full, empty, spacing, 1.0) == 0.0
        assert dice_score(empty, full) == normalized_surface_dice(empty, full, spacing, 1.0) == 0.0
        assert surface_dice_from_distances(compute_surface_distances(empty, full, spacing), 1.0) == 0.0
        assert surface_dice_from_distances(compute_surface_distances(empty, empty, spacing), 1.0) == 1.0


def test_accepts_0_1_integer_and_float_masks():
    gt = _cube((8, 8), (2, 2), (4, 4))
    pred = np.roll(gt, 1, axis=1)
    expected = normalized_surface_dice(pred, gt, (1.0, 1.0), 0.5)
    assert normalized_surface_dice(pred.astype(np.uint8), gt.astype(np.float32), (1.0, 1.0), 0.5) == expected
    assert dice_score(pred.astype(np.int64), gt.astype(np.uint8)) == dice_score(pred, gt)


@pytest.mark.parametrize(
    ("pred", "gt", "spacing", "tolerance", "message"),
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), (1, 1), 1.0, "shapes differ"),
        (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1), 1.0, "ARRAY AXIS ORDER"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1, 0), 1.0, "positive"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1, -2), 1.0, "positive"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1, 1), -0.5, "tolerance"),
        (np.full((4, 4), 2), np.zeros((4, 4), bool), (1, 1), 1.0, "pred has values other than 0 and 1"),
        (np.zeros((4, 4), bool), np.full((4, 4), 0.5), (1, 1), 1.0, "gt has values other than 0 and 1"),
        (np.zeros(4, bool), np.zeros(4, bool), (1,), 1.0, "2D"),
    ],
)
def test_bad_input_is_refused_by_name(pred, gt, spacing, tolerance, message):
    with pytest.raises(ValueError, match=message):
        normalized_surface_dice(pred, gt, spacing, tolerance)


def test_dice_checks_its_input_too():
    with pytest.raises(ValueError, match="shapes differ"):
        dice_score(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="pred has values other than 0 and 1"):
        dice_score(np.full((3, 3), 3), np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# The evaluate module
# ---------------------------------------------------------------------------------------------


def test_evaluate_load_gives_the_same_numbers_offline(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)
    rng = np.random.default_rng(5)
    volumes = [(_blob(rng, (6, 12, 10)), _blob(rng, (6, 12, 10)), (2.5, 0.8, 0.7)) for _ in range(2)]
    images = [(_blob(rng, (16, 14)), _blob(rng, (16, 14)), (0.5, 0.5)) for _ in range(2)]
    for examples in (volumes, images):
        metric = evaluate.load(EVALUATE_METRIC_PATH)
        preds, refs, spacings = zip(*examples)
        result = metric.compute(predictions=list(preds), references=list(refs), spacing=list(spacings), tolerance=1.2)
        expected_nsd = [normalized_surface_dice(p, r, s, 1.2) for p, r, s in examples]
        expected_dsc = [dice_score(p, r) for p, r, _ in examples]
        assert result["per_example_nsd"] == pytest.approx(expected_nsd, abs=1e-12)
        assert result["per_example_dice"] == pytest.approx(expected_dsc, abs=1e-12)
        assert result["nsd"] == pytest.approx(np.mean(expected_nsd))
        assert result["dice"] == pytest.approx(np.mean(expected_dsc))
