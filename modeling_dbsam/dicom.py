"""DICOM in and out: the files of a series in the order the volume is stacked, DICOM series shipped as a
zip, and label maps written back as DICOM Segmentation objects (DICOM-SEG, through highdicom) that
reference the source instances and share their frame of reference, so clinical viewers overlay them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from modeling_dbsam.io import atomic_write, check_output_path
from modeling_dbsam.objects import LabelMap, object_colour


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Every DICOM series in ``folder`` (searched recursively): series UID -> files in stacking order."""
    reader = sitk.ImageSeriesReader()
    series = {}
    for directory in sorted({str(p.parent) for p in Path(folder).rglob("*") if p.is_file()} | {str(folder)}):
        for uid in reader.GetGDCMSeriesIDs(directory):
            series.setdefault(uid, list(reader.GetGDCMSeriesFileNames(directory, uid)))
    return series


def unpack_dicom_zip(path: str | os.PathLike, destination: str | os.PathLike) -> tuple[str, str]:
    """Extract a zip of DICOM files; return the folder of its series and a note for the user.

    A zip with several series gives the one with the most slices, and the note says so and names the others.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                target = (Path(destination) / member.filename).resolve()
                if not target.is_relative_to(Path(destination).resolve()):
                    raise ValueError(f"{path.name}: unsafe path {member.filename!r} in the zip")
            archive.extractall(destination)
    except zipfile.BadZipFile:
        raise ValueError(f"{path.name}: not a valid zip file") from None
    series = dicom_series(destination)
    if not series:
        raise ValueError(f"{path.name}: the zip holds no DICOM series")
    ranked = sorted(series.items(), key=lambda item: -len(item[1]))
    uid, files = ranked[0]
    chosen = Path(destination) / f"series-{len(files)}"
    chosen.mkdir()
    for index, file in enumerate(files):
        os.replace(file, chosen / f"{index:05d}.dcm")
    note = f"{path.name}: one DICOM series of {len(files)} slices"
    if len(ranked) > 1:
        others = ", ".join(f"{u} ({len(f)} slices)" for u, f in ranked[1:])
        note = (
            f"{path.name} holds {len(ranked)} DICOM series; opened the largest, {uid} ({len(files)} slices). "
            f"Not opened: {others}. Zip one series to choose another."
        )
    return str(chosen), note


def source_files(path: str | os.PathLike) -> list[str]:
    """The DICOM files behind :func:`modeling_dbsam.io.read_image` of ``path``, one per array slice, in order."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    series = dicom_series(path) if path.is_dir() else {}
    if len(series) != 1:
        raise ValueError(f"{path}: holds {len(series)} DICOM series; need exactly one")
    reader = sitk.ImageSeriesReader()
    return list(reader.GetGDCMSeriesFileNames(str(path), next(iter(series))))


def check_dicom_seg_source(path: str | os.PathLike) -> None:
    """A DICOM-SEG needs highdicom and DICOM source images (a series folder or a ``.dcm`` file)."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ValueError('needs highdicom: pip install "dbsam-transformers[dicom]"') from None
    import pydicom

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files or not _is_dicom(files[0], pydicom):
        raise ValueError(
            f"{path} is not DICOM; DICOM-SEG references the source DICOM images, so it needs a DICOM series "
            "folder or .dcm file as input (write .nii.gz or .nrrd instead)"
        )


def _is_dicom(path: Path, pydicom) -> bool:
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # any reader failure means "not DICOM" here; read_image reports the details
        return False
    return True


def write_dicom_seg(
    path: str | os.PathLike, label_map: LabelMap, source: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``label_map`` (values 1..N) as a binary DICOM-SEG over the DICOM ``source`` (series folder or file).

    One segment per object, with its name and colour; frames match the source instances one to one.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from modeling_dbsam import __version__

    check_output_path(path, overwrite)
    datasets = [pydicom.dcmread(f) for f in source_files(source)]
    labels = label_map.labels if label_map.labels.ndim == 3 else label_map.labels[None]
    if len(labels) != len(datasets):
        raise ValueError(f"label map has {len(labels)} slices but {source} has {len(datasets)} DICOM instances")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="DB-SAM", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=name,
            display_color=hd.color.CIELabColor.from_rgb(*object_colour(value)),
        )
        for value, name in enumerate(label_map.names, start=1)
    ]
    segmentation = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.ascontiguousarray(labels.astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dbsam-transformers",
        manufacturer_model_name="DB-SAM",
        software_versions=__version__,
        device_serial_number="none",
        series_description="DB-SAM segmentation",
        omit_empty_frames=bool(labels.any()),  # a SEG needs at least one frame
    )
    return atomic_write(path, lambda tmp: segmentation.save_as(tmp), overwrite)
