"""DSC and NSD of 2D or 3D binary masks as an ``evaluate`` metric, with per-example spacing.

A thin wrapper: the numbers come from :mod:`modeling_dbsam.metrics` (``dice_score``,
``normalized_surface_dice``). Load it offline with
``evaluate.load(modeling_dbsam.metrics.EVALUATE_METRIC_PATH)``.
"""

import datasets
import evaluate
import numpy as np

from modeling_dbsam.metrics import dice_score, normalized_surface_dice

_DESCRIPTION = """
Dice similarity coefficient (DSC) and normalized surface Dice (NSD) of box-prompted segmentations,
as reported by MedSAM and DB-SAM. NSD follows DeepMind's surface-distance definition: marching-cubes
surface elements weighted by their area in mm^2 (length in mm in 2D), matched within `tolerance` mm.
Both masks empty gives 1 for DSC and NSD; exactly one empty gives 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: binary masks (2D (y, x) or 3D (z, y, x); bool or 0/1), one per example.
    references: ground-truth masks of the same shapes.
    spacing: per example, the voxel size in mm in ARRAY AXIS ORDER ((z, y, x) for a (Z, Y, X)
        volume, (y, x) for an image); ones measure in voxels (the paper protocol).
    tolerance: NSD tolerance in mm (default 1.0).
Returns:
    dice, nsd: means over examples; per_example_dice, per_example_nsd: the values per example.
Examples:
    >>> import evaluate, numpy as np
    >>> from modeling_dbsam.metrics import EVALUATE_METRIC_PATH
    >>> metric = evaluate.load(EVALUATE_METRIC_PATH)
    >>> mask = np.zeros((8, 8), bool); mask[2:6, 2:6] = True
    >>> metric.compute(predictions=[mask], references=[mask], spacing=[(0.8, 0.8)])["nsd"]
    1.0
"""

_CITATION = """
@inproceedings{dbsam2024,
  title={DB-SAM: Delving into High Quality Universal Medical Image Segmentation},
  booktitle={MICCAI},
  year={2024}
}
@article{nikolov2021clinically,
  title={Clinically applicable segmentation of head and neck anatomy for radiotherapy: deep learning algorithm development and validation study},
  author={Nikolov, Stanislav and others},
  journal={Journal of Medical Internet Research},
  volume={23},
  number={7},
  year={2021}
}
"""


def _mask_features(ndim: int) -> datasets.Features:
    mask = datasets.Value("bool")
    for _ in range(ndim):
        mask = datasets.Sequence(mask)
    return datasets.Features(
        {"predictions": mask, "references": mask, "spacing": datasets.Sequence(datasets.Value("float64"))}
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DbsamSegmentation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[_mask_features(2), _mask_features(3)],
            reference_urls=["https://github.com/google-deepmind/surface-distance"],
        )

    def _infer_feature_from_example(self, example):
        # evaluate tries the schemas in order without checking array depth; choose by it instead.
        ndim = np.ndim(example["predictions"])
        if ndim not in (2, 3):
            raise ValueError(f"predictions must be 2D (y, x) or 3D (z, y, x) masks, got {ndim}D")
        return self.features[ndim - 2]

    def _compute(self, predictions, references, spacing, tolerance: float = 1.0):
        dice = [dice_score(np.asarray(p, bool), np.asarray(r, bool)) for p, r in zip(predictions, references)]
        nsd = [
            normalized_surface_dice(np.asarray(p, bool), np.asarray(r, bool), s, tolerance)
            for p, r, s in zip(predictions, references, spacing)
        ]
        return {
            "dice": float(np.mean(dice)),
            "nsd": float(np.mean(nsd)),
            "per_example_dice": dice,
            "per_example_nsd": nsd,
        }
