"""Build ``data/nuclei/``: real fluorescence-microscopy nuclei with expert instance labels, a second modality.

The source is the 512 x 512 image and its instance mask that the ``stardist`` wheel on PyPI bundles
(``stardist/data/images/img2d.tif`` and ``mask2d.tif``, from the 2018 Data Science Bowl, BBBC038v1:
Caicedo et al., Nature Methods 16:1247-1253, 2019). The wheel is fetched with ``pip download`` and
read as a zip file; stardist itself (and TensorFlow) is never installed.

The image is cut into 16 tiles of 128 x 128 pixels (native resolution, no resizing); each tile is a case.
The four tiles of the bottom-right quadrant are the test cases; the other twelve are split into train
and validation by the project's seeded case split (``assign_splits``, the same call that
``prepare_raw_dataset`` makes, so the assignment is known before the tiles are written). A nucleus that
a tile edge cuts between tiles of two different splits is removed from both, so no nucleus is in two
splits; one cut between two tiles of the same split stays, as two partial objects. Each nucleus on its
tile is one example.

    python scripts/make_nuclei_sample.py --out data/nuclei --overwrite
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile

from modeling_dbsam.data import prepare_raw_dataset
from modeling_dbsam.data.pairing import RawCase
from modeling_dbsam.data.splits import assign_splits, parse_split

WHEEL = "stardist==0.9.2"
IMAGE, MASK = "stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"
TILE = 128
VALIDATION_SPLIT = "0.8,0.2,0"
SEED = 0
NOTES = """\
## Provenance and licence

Made by `python scripts/make_nuclei_sample.py` from the fluorescence-microscopy image of cell nuclei
and its instance labels bundled in the `stardist` 0.9.2 wheel on PyPI (`stardist/data/images/img2d.tif`,
`mask2d.tif`; the stardist package is BSD-3-Clause, Copyright (c) 2018-2025 Uwe Schmidt, Martin Weigert).
The image comes from the 2018 Data Science Bowl, image set BBBC038v1 of the Broad Bioimage Benchmark
Collection (Caicedo et al., "Nucleus segmentation across imaging experiments: the 2018 Data Science
Bowl", Nature Methods 16:1247-1253, 2019), which the collection distributes under CC0 1.0.

One 512 x 512 image cut into 16 tiles of 128 x 128 px at native resolution (each tile is a case). Test:
the four tiles of the bottom-right quadrant; train and validation: the other twelve, split by a seeded
shuffle of tiles (seed 0). Nuclei cut by an edge between tiles of two different splits are removed from
the labels of both, so no nucleus is in two splits. Test nuclei are never training nuclei, but they are from the same image and experiment. A
demonstration of a second modality, not a benchmark."""

LICENCE = """\
Derived from the stardist 0.9.2 wheel (PyPI), files stardist/data/images/img2d.tif and mask2d.tif.

stardist: BSD 3-Clause License, Copyright (c) 2018-2025, Uwe Schmidt, Martin Weigert. All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met: (1) Redistributions of source code must retain the
above copyright notice, this list of conditions and the following disclaimer. (2) Redistributions in
binary form must reproduce the above copyright notice, this list of conditions and the following
disclaimer in the documentation and/or other materials provided with the distribution. (3) Neither
the name of the copyright holder nor the names of its contributors may be used to endorse or promote
products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR
ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT
LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN
IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

The image itself: 2018 Data Science Bowl, BBBC038v1 (Broad Bioimage Benchmark Collection), CC0 1.0.
"""


def read_wheel(wheel: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The image and instance mask from the stardist wheel (downloaded with pip unless ``wheel`` is given)."""
    with tempfile.TemporaryDirectory() as folder:
        if wheel is None:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", folder, WHEEL]
            subprocess.run(command, check=True)
            wheel = next(Path(folder).glob("stardist-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            image = tifffile.imread(io.BytesIO(archive.read(IMAGE)))
            mask = tifffile.imread(io.BytesIO(archive.read(MASK)))
    if image.shape != mask.shape or image.ndim != 2:
        raise ValueError(f"expected one 2D image and mask of one shape, got {image.shape} and {mask.shape}")
    return image, mask


def tile_splits(rows: int, columns: int) -> dict[tuple[int, int], str]:
    """The split of every tile: bottom-right quadrant test, the rest by the seeded case split."""
    test = {(r, c) for r in range(rows // 2, rows) for c in range(columns // 2, columns)}
    cases = [
        RawCase(f"dsb2018_tile_r{r}c{c}", "", "", "test" if (r, c) in test else None)
        for r in range(rows)
        for c in range(columns)
    ]
    tiles = {}
    for split, members in assign_splits(cases, parse_split(VALIDATION_SPLIT), SEED).items():
        for case in members:
            tiles[int(case.case_id[-3]), int(case.case_id[-1])] = split
    return tiles


def write_tile_cases(raw_dir: Path, image: np.ndarray, mask: np.ndarray) -> None:
    """One case per tile in the nnU-Net layout, without nuclei shared by tiles of two splits."""
    rows, columns = image.shape[0] // TILE, image.shape[1] // TILE
    splits = tile_splits(rows, columns)
    split_map = np.empty(image.shape, object)
    for (row, column), split in splits.items():
        split_map[row * TILE : (row + 1) * TILE, column * TILE : (column + 1) * TILE] = split
    shared = [n for n in np.unique(mask[mask > 0]) if len(set(split_map[mask == n])) > 1]
    mask = np.where(np.isin(mask, shared), 0, mask)
    for (row, column), split in splits.items():
        window = np.s_[row * TILE : (row + 1) * TILE, column * TILE : (column + 1) * TILE]
        folder = "Ts" if split == "test" else "Tr"
        case = f"dsb2018_tile_r{row}c{column}"
        for kind, array, name in (("images", image[window], f"{case}_0000"), ("labels", mask[window], case)):
            (raw_dir / f"{kind}{folder}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(array), str(raw_dir / f"{kind}{folder}" / f"{name}.nrrd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/nuclei", help="output folder (default data/nuclei)")
    parser.add_argument("--wheel", type=Path, help="a downloaded stardist 0.9.2 wheel (default: pip download it)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    image, mask = read_wheel(args.wheel)
    with tempfile.TemporaryDirectory() as work:
        raw_dir = Path(work) / "dsb2018_nuclei"
        write_tile_cases(raw_dir, image, mask)
        report = prepare_raw_dataset(
            raw_dir,
            args.out,
            modality="Microscopy",
            task="Microscopy Nuclei (DSB 2018)",
            size=None,
            split=VALIDATION_SPLIT,
            seed=SEED,
            overwrite=args.overwrite,
            card_notes=NOTES,
            licence="cc0-1.0",
        )
    (Path(args.out) / "LICENSE").write_text(LICENCE, encoding="utf-8")
    print(report.summary())


if __name__ == "__main__":
    main()
