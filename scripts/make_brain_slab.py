"""Cut the small real volumes in ``data/brain_slab/`` from Debian's mricron-data brain MR and AAL atlas.

Tests, benchmarks and the docs' demo need a real scan with real labels, but must not read system
paths: this script cuts axial slices 60-86 of the Colin27 T1 MR (``ch2.nii.gz``, uint8, 1 mm) and
of the AAL atlas (``aal.nii.gz``) on the same grid, keeping the full 181 x 217 in-plane size and the
geometry (the origin moves with the cut, so world coordinates are unchanged). Run it on a machine
with ``apt-get install mricron-data``:

    python scripts/make_brain_slab.py --out data/brain_slab
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk

TEMPLATES = Path("/usr/share/mricron/templates")
FIRST, LAST = 60, 86
"""Axial slice range (inclusive) of the original volumes; slice k of the slab is slice FIRST + k."""

README = f"""\
# Brain slab: 27 axial slices of the Colin27 MR and the AAL atlas

- `ch2_z{FIRST}-{LAST}.nii.gz`: slices {FIRST}-{LAST} (z) of `ch2.nii.gz`, the Colin27 single-subject T1 MR
  average of the Montreal Neurological Institute, uint8, 181 x 217 x 27 voxels of 1 mm.
- `aal_z{FIRST}-{LAST}.nii.gz`: the same slices of `aal.nii.gz`, the Automated Anatomical Labeling atlas
  (Tzourio-Mazoyer et al., NeuroImage 15:273-289, 2002), on the same grid. Label values as in
  mricron's `aal.nii.txt` (e.g. 7 Frontal_Mid_L, 47/48 Lingual L/R, 85/86 Temporal_Mid L/R).

Made by `python scripts/make_brain_slab.py` from Debian's `mricron-data` package, distributed there under
the BSD-3-clause licence (Copyright 2006-2010 Chris Rorden); see `LICENSE`. Used by the tests, the data
benchmark and the inference demo in `docs/inference.md`, so that none of them reads a system path.
"""


def write_gzip(image: sitk.Image, path: Path) -> None:
    """Write ``path`` (.nii.gz) with gzip level 9 and no timestamp, so reruns give identical bytes."""
    with tempfile.TemporaryDirectory() as work:
        plain = Path(work) / "volume.nii"
        sitk.WriteImage(image, str(plain), useCompression=False)
        with (
            open(plain, "rb") as source,
            open(path, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as target,
        ):
            shutil.copyfileobj(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/brain_slab", help="output folder (default data/brain_slab)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    atlas = sitk.ReadImage(str(TEMPLATES / "aal.nii.gz"))
    if image.GetSize() != atlas.GetSize() or image.GetOrigin() != atlas.GetOrigin():
        raise SystemExit("ch2.nii.gz and aal.nii.gz are not on one grid")
    for name, volume in (("ch2", image), ("aal", atlas)):
        write_gzip(volume[:, :, FIRST : LAST + 1], out / f"{name}_z{FIRST}-{LAST}.nii.gz")
    (out / "README.md").write_text(README, encoding="utf-8")
    licence = Path(__file__).resolve().parents[1] / "data" / "sample" / "LICENSE"
    (out / "LICENSE").write_text(licence.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
