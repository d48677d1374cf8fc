"""Build the small real dataset in ``data/sample/`` from Debian's mricron-data brain MR and AAL atlas.

The Colin27 T1 MR (``ch2.nii.gz``, 1 mm) and the AAL atlas (``aal.nii.gz``) share one grid (checked;
the labels would otherwise be resampled onto the MR with nearest neighbour). Six large structures
exist in both hemispheres; each left/right pair becomes one label value. The left hemisphere is the
training case and the right hemisphere the test case (the other half of the head zeroed), so no
voxel is in both splits. The two cases go through ``prepare_raw_dataset`` exactly as a user's data
would (nnU-Net layout, imagesTs as the test split).

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
STRUCTURES = ("Precentral", "Frontal_Sup", "Frontal_Mid", "Postcentral", "Precuneus", "Temporal_Mid")
NOTES = """\
## Provenance and licence

Made by `python scripts/make_sample.py` from Debian's `mricron-data` package
(`/usr/share/mricron/templates/ch2.nii.gz`, the Colin27 single-subject T1 MR average of the
Montreal Neurological Institute, and `aal.nii.gz`, the Automated Anatomical Labeling atlas of
Tzourio-Mazoyer et al., NeuroImage 15:273-289, 2002), distributed there under the BSD-3-clause
licence (Copyright 2006-2010 Chris Rorden; see /usr/share/doc/mricron-data/copyright). The same
terms apply to this derivative. Train: the left hemisphere; test: the right hemisphere of the
one subject. A demonstration set for quick starts and tests, not a benchmark."""

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


def write_hemisphere_cases(raw_dir: Path) -> dict[int, str]:
    """Write the two hemisphere cases in the nnU-Net layout; return label value -> structure name."""
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    atlas = sitk.GetArrayFromImage(_on_grid(sitk.ReadImage(str(TEMPLATES / "aal.nii.gz")), image))
    ids = _atlas_ids(TEMPLATES / "aal.nii.txt")
    merged = np.zeros(atlas.shape, np.uint8)
    for value, name in enumerate(STRUCTURES, start=1):
        merged[np.isin(atlas, [ids[f"{name}_L"], ids[f"{name}_R"]])] = value
    left_x = np.nonzero(atlas == ids[f"{STRUCTURES[0]}_L"])[2].mean()
    right_x = np.nonzero(atlas == ids[f"{STRUCTURES[0]}_R"])[2].mean()
    columns = np.arange(atlas.shape[2])
    midline = (left_x + right_x) / 2
    pixels = sitk.GetArrayFromImage(image)
    for case, keep, folder in (
        ("colin27_left", (columns < midline) == (left_x < midline), "Tr"),
        ("colin27_right", (columns < midline) == (right_x < midline), "Ts"),
    ):
        for kind, array, name in (("images", pixels, f"{case}_0000"), ("labels", merged, case)):
            half = np.where(keep[None, None, :], array, 0).astype(array.dtype)
            out = sitk.GetImageFromArray(half)
            out.CopyInformation(image)
            (raw_dir / f"{kind}{folder}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(out, str(raw_dir / f"{kind}{folder}" / f"{name}.nii.gz"), useCompression=True)
    return {value: name.replace("_", " ") for value, name in enumerate(STRUCTURES, start=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", help="output folder (default data/sample)")
    parser.add_argument("--size", type=int, default=128, help="slice size in pixels (default 128)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        raw_dir = Path(work) / "colin27_aal"
        label_names = write_hemisphere_cases(raw_dir)
        report = prepare_raw_dataset(
            raw_dir,
            args.out,
            modality="MR-T1",
            task="MR-T1 Brain Structures (AAL)",
            size=args.size,
            overwrite=args.overwrite,
            label_names=label_names,
            card_notes=NOTES,
            licence="bsd-3-clause",
        )
    (Path(args.out) / "LICENSE").write_text(LICENCE, encoding="utf-8")
    print(report.summary())


if __name__ == "__main__":
    main()
