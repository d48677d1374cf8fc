"""MedSAM's intensity rules: the one place that turns raw CT/MR/PET values into uint8.

Dataset import, the processor saved with each checkpoint and volume inference all call
:func:`to_uint8`, so a model sees the same intensities in training and at inference.

Non-finite values (NaN, +inf, -inf, e.g. outside the field of view after a resampling) never
decide a rule: percentiles are taken over the finite voxels only. When a rule is applied, NaN
becomes 0 (background), -inf the low end (0) and +inf the high end (255) of the range. Callers
report how many there were (:func:`non_finite_note`); a volume with no finite value is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CT_WINDOW = (40.0, 400.0)
"""(level, width) in HU: MedSAM's soft-tissue default."""

CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
}
"""Named (level, width) presets in HU."""

MODALITY_FAMILIES = (
    "CT", "MR", "PET", "SPECT", "Ultrasound", "X-Ray", "Mammography", "Endoscope", "Pathology", "Retinal Image",
    "Fundus", "OCT", "Dermoscopy", "Microscopy",
)  # fmt: skip
"""Modalities by family: ``MR-T1``, ``MR-FLAIR``... are MR. Only CT has its own rule (a window); the rest
are clipped at percentiles, so a mistyped modality (``CT `` spelt ``TC``) would silently lose its window."""

PERCENTILE_CLIP = (0.5, 99.5)
"""Non-CT modalities are clipped at these percentiles of the non-zero voxels."""


@dataclass(frozen=True)
class IntensityRule:
    """A rule fitted on a whole volume and applied to any part of it, so that slice-by-slice import
    keeps MedSAM's volume-level percentiles without holding a converted copy of the volume.

    ``low`` and ``high`` of ``None`` mean pass-through (the input is already uint8).
    """

    low: float | None
    high: float | None
    keep_zero: bool = False

    def __call__(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if self.low is None:
            return values
        scaled = _scale_to_uint8(values, self.low, self.high)
        if self.keep_zero:
            scaled[values == 0] = 0
        if values.dtype.kind == "f":
            scaled[np.isnan(values)] = 0  # see the module docstring; +/-inf were clipped to the range's ends
        return scaled


def ct_window_rule(level: float, width: float) -> IntensityRule:
    """Clip HU values to ``level +/- width/2`` and scale linearly to uint8 [0, 255]."""
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return IntensityRule(level - width / 2.0, level + width / 2.0)


def percentile_rule(
    values: np.ndarray, low: float = PERCENTILE_CLIP[0], high: float = PERCENTILE_CLIP[1]
) -> IntensityRule:
    """Clip at percentiles of the non-zero voxels of ``values``, scale to uint8, keep zero background at 0."""
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high})")
    nonzero = values[(values != 0) & np.isfinite(values)] if values.dtype.kind == "f" else values[values != 0]
    if nonzero.size == 0:
        return IntensityRule(0.0, 0.0, keep_zero=True)
    lo, hi = np.percentile(nonzero, [low, high])
    return IntensityRule(float(lo), float(hi), keep_zero=True)


def window_ct(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip HU values to ``level +/- width/2`` and scale linearly to uint8 [0, 255]."""
    return ct_window_rule(level, width)(values)


def clip_percentiles(
    values: np.ndarray, low: float = PERCENTILE_CLIP[0], high: float = PERCENTILE_CLIP[1]
) -> np.ndarray:
    """Clip at percentiles of the non-zero voxels, scale to uint8, keep zero background at 0."""
    return percentile_rule(values, low, high)(values)


def check_modality(modality: str) -> str:
    """``modality`` if its family (the part before ``-``) is one of :data:`MODALITY_FAMILIES`, any case; else an error."""
    family = modality.split("-")[0].strip().lower() if not modality.lower().startswith("x-ray") else "x-ray"
    if family not in {known.lower() for known in MODALITY_FAMILIES}:
        raise ValueError(
            f"unknown modality {modality!r}; use one of {', '.join(MODALITY_FAMILIES)} (a suffix such as MR-T1 is fine)"
        )
    return modality


def fit_intensity_rule(
    values: np.ndarray, modality: str, window: tuple[float, float] | str | None = None
) -> IntensityRule:
    """The rule for ``modality`` fitted on ``values`` (a whole volume): a CT window (a (level, width) pair
    or a preset name) or percentile clipping; uint8 input passes through unchanged.
    """
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return IntensityRule(None, None)
    if values.dtype.kind == "f" and values.size and not np.isfinite(values).any():
        raise ValueError("the image holds no finite value (every voxel is NaN or infinite)")
    if modality.upper() == "CT":
        if isinstance(window, str):
            if window not in CT_WINDOW_PRESETS:
                raise ValueError(f"unknown CT window preset {window!r}; known: {sorted(CT_WINDOW_PRESETS)}")
            window = CT_WINDOW_PRESETS[window]
        level, width = window if window is not None else DEFAULT_CT_WINDOW
        return ct_window_rule(level, width)
    if window is not None:
        raise ValueError(f"a CT window was given for modality {modality!r}; windows apply to CT only")
    return percentile_rule(values)


def to_uint8(values: np.ndarray, modality: str, window: tuple[float, float] | str | None = None) -> np.ndarray:
    """Apply the rule for ``modality``: a CT window (a (level, width) pair or a preset name) or percentile clipping.

    uint8 input is returned unchanged (already displayable, e.g. 2D photographs).
    """
    return fit_intensity_rule(values, modality, window)(values)


def non_finite_note(values: np.ndarray) -> str | None:
    """A sentence saying how many NaN / infinite values ``values`` holds and what the rules make of them; ``None`` if none."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        return None
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if not nan and not inf:
        return None
    return (
        f"{nan} NaN and {inf} infinite values out of {values.size}: intensity rules ignore them, "
        "and NaN becomes 0, -inf 0 and +inf 255"
    )


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    values = np.clip(values.astype(np.float32), low, high)
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # NaN, set by the caller
        return np.nan_to_num(np.round((values - low) / span * 255.0), nan=0.0).astype(np.uint8)
