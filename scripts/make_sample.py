"""Build the small real dataset in ``data/sample/`` from Debian's mricron-data brain MR and AAL atlas.

The Colin27 T1 MR (``ch2.nii.gz``, 1 mm) and the AAL atlas (``aal.nii.gz``) share one grid (checked;
the labels would otherwise be resampled onto the MR with nearest neighbour). Eight structures, each
in the left and the right hemisphere (16 label values), are labelled on whole-head axial slices.
There is one subject, so the splits are by slab: the labelled z range is cut into slabs of
``SLAB`` slices with ``GAP`` unlabelled slices between neighbours (adjacent 1 mm slices are
near-duplicates); every fourth slab is a test case (``imagesTs``), and the others are split into
train and validation by the project's seeded case split (0.8 / 0.2). No slice is in two splits, and
each split spans the head from the temporal lobes to the vertex, so a model cannot learn a split's
position. The cases go through ``prepare_raw_dataset`` exactly as a user's data would.

    python scripts/make_sample.py --out data/sample --overwrite
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from modeling_dbsam.data import prepare_raw_dataset

TEMPLATES = Path("/usr/share/mricron/templates")
STRUCTURES = (
    "Precentral",
    "Frontal_Sup",
    "Frontal_Mid",
    "Postcentral",
    "Precuneus",
    "Temporal_Mid",
    "Insula",
    "Cingulum_Mid",
)
SIDES = ("L", "R")
SLAB, GAP = 8, 2  # slices per case, unlabelled slices between neighbouring cases
TEST_EVERY = 4  # slabs 1, 5, 9, ... are test cases
VALIDATION_SPLIT = "0.8,0.2,0"  # of the other slabs, by modeling_dbsam.data.splits
VALIDATION_SEED = 1  # seed 0 puts the two smallest slabs (32 examples) in validation; 1 gives 172
NOTES = """\
## Provenance and licence

Made by `python scripts/make_sample.py` from Debian's `mricron-data` package
(`/usr/share/mricron/templates/ch2.nii.gz`, the Colin27 single-subject T1 MR average of the
Montreal Neurological Institute, and `aal.nii.gz`, the Automated Anatomical Labeling atlas of
Tzourio-Mazoyer et al., NeuroImage 15:273-289, 2002), distributed there under the BSD-3-clause
licence (Copyright 2006-2010 Chris Rorden; see /usr/share/doc/mricron-data/copyright). The same
terms apply to this derivative. One subject, whole-head axial slices, split by slab: each case is a
slab of 8 axial slices (z index in its case id), 2 unlabelled slices between neighbouring slabs;
every fourth slab is a test case, the others were split into train and validation by a seeded
shuffle of cases (seed 1). Test slices are never training slices, but they are slices of the same
brain: a test of generalising across the head, not across subjects. A demonstration set for quick
starts, experiments and tests, not a benchmark."""

LICENCE = """\
Derived from Debian's mricron-data templates (ch2.nii.gz, aal.nii.gz); per
/usr/share/doc/mricron-data/copyright:

Copyright 2006-2010, Chris Rorden
License: BSD-3-clause

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:

Redistributions of source code must retain the above copyright notice, this list of conditions and
the following disclaimer.

Redistributions in binary form must reproduce the above copyright notice, this list of conditions
and the following disclaimer in the documentation and/or other materials provided with the
distribution. Neither the names of the copyright owners nor the names of this project (MRIcron) may
be used to endorse or promote products derived from this software without specific prior written
permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS
BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES
(INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE
USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def _atlas_ids(names_file: Path) -> dict[str, int]:
    ids = {}
    for line in names_file.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            ids[fields[1]] = int(fields[0])
    return ids


def _on_grid(labels: sitk.Image, image: sitk.Image) -> sitk.Image:
    same = (
        labels.GetSize() == image.GetSize()
        and np.allclose(labels.GetSpacing(), image.GetSpacing())
        and np.allclose(labels.GetOrigin(), image.GetOrigin())
        and np.allclose(labels.GetDirection(), image.GetDirection())
    )
    if same:
        return labels
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def write_slab_cases(raw_dir: Path) -> dict[int, str]:
    """Write one case per slab in the nnU-Net layout; return label value -> structure name."""
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    atlas = sitk.GetArrayFromImage(_on_grid(sitk.ReadImage(str(TEMPLATES / "aal.nii.gz")), image))
    ids = _atlas_ids(TEMPLATES / "aal.nii.txt")
    names = [f"{name}_{side}" for name in STRUCTURES for side in SIDES]
    labels = np.zeros(atlas.shape, np.uint8)
    for value, name in enumerate(names, start=1):
        labels[atlas == ids[name]] = value
    labelled = np.nonzero(labels.any(axis=(1, 2)))[0]
    for index, start in enumerate(range(labelled.min(), labelled.max() + 1, SLAB + GAP)):
        slab = np.zeros(labels.shape[0], bool)
        slab[start : start + SLAB] = True
        folder = "Ts" if index % TEST_EVERY == 1 else "Tr"
        case = f"colin27_z{start:03d}"
        out = sitk.GetImageFromArray(np.where(slab[:, None, None], labels, 0).astype(np.uint8))
        out.CopyInformation(image)
        for kind, item, name in (("images", image, f"{case}_0000"), ("labels", out, case)):
            (raw_dir / f"{kind}{folder}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(item, str(raw_dir / f"{kind}{folder}" / f"{name}.nii.gz"), useCompression=True)
    return {value: name.replace("_", " ") for value, name in enumerate(names, start=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", help="output folder (default data/sample)")
    parser.add_argument("--size", type=int, default=128, help="slice size in pixels (default 128)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        raw_dir = Path(work) / "colin27_aal"
        label_names = write_slab_cases(raw_dir)
        report = prepare_raw_dataset(
            raw_dir,
            args.out,
            modality="MR-T1",
            task="MR-T1 Brain Structures (AAL)",
            size=args.size,
            split=VALIDATION_SPLIT,
            seed=VALIDATION_SEED,
            overwrite=args.overwrite,
            label_names=label_names,
            card_notes=NOTES,
            licence="bsd-3-clause",
        )
    (Path(args.out) / "LICENSE").write_text(LICENCE, encoding="utf-8")
    print(report.summary())


if __name__ == "__main__":
    main()
