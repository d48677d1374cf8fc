"""What the app does, without the web page: open a scan, turn clicks into a box, segment named objects,
draw the overlay and export the label map. The Gradio page (:mod:`modeling_dbsam.app.ui`) only wires
these to components, so they are tested directly and the page stays thin.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modeling_dbsam.inference import encode_slices
from modeling_dbsam.intensity import CT_WINDOW_PRESETS
from modeling_dbsam.objects import LabelMap, ObjectPrompt, object_colour, resolve_overlaps, segment_objects
from modeling_dbsam.predictor import EncodedImages
from modeling_dbsam.processing import IntensityConfig, to_model_rgb

MODEL_WINDOW = "model's rule"
"""The display choice that shows the scan as the model sees it (the rule saved with its processor)."""

MODES = ("slice", "3D box", "propagate")
"""Segment the box on the shown slice, on every slice of a z-range, or from the shown slice up and down."""

EXPORT_FORMATS = (".nii.gz", ".nrrd", "DICOM-SEG")
DISPLAY_SIDE = 512
"""Small slices are enlarged by a whole factor up to about this many pixels, so boxes can be drawn on them."""
OVERLAY_ALPHA = 0.5


@dataclass
class Scan:
    """An opened image: raw values with their geometry, and the DICOM it came from (for DICOM-SEG)."""

    array: np.ndarray  # (z, y, x) for volumes, (y, x) or (y, x, 3) for 2D images
    reference: object  # SimpleITK image with the geometry
    is_volume: bool
    name: str
    dicom_source: str | None = None  # series folder or .dcm file
    note: str = ""
    folder: str | None = None  # temporary folder owned by this scan (unpacked zip, uploaded DICOM files)
    _shown: dict = field(default_factory=dict, repr=False)

    @property
    def depth(self) -> int:
        return len(self.array) if self.is_volume else 1

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.array.shape[1:3] if self.is_volume else self.array.shape[:2]

    def shown(self, intensity: IntensityConfig) -> np.ndarray:
        """The scan as uint8 under ``intensity``: ``(z, y, x)`` for a volume (windowed as a whole, as the model's
        rule fits a volume), ``(1, y, x, 3)`` RGB for a 2D image; computed once per rule."""
        key = (intensity.modality, intensity.window)
        if key not in self._shown:
            if self.is_volume:
                self._shown[key] = intensity.to_uint8(self.array)
            else:
                self._shown[key] = to_model_rgb(self.array, intensity)[None]
        return self._shown[key]


@dataclass
class SegmentedObject:
    name: str
    prompt: ObjectPrompt
    mask: np.ndarray  # bool, the scan's spatial shape
    scores: np.ndarray  # (depth,) predicted IoU per slice, NaN where not segmented


@dataclass
class SliceEmbedding:
    """The image embedding of one slice and what it was computed from (see :func:`slice_embedding`)."""

    scan: Scan
    model: object
    intensity: IntensityConfig
    z: int
    encoded: EncodedImages

    def is_for(self, scan: Scan, model, intensity: IntensityConfig, z: int) -> bool:
        return self.scan is scan and self.model is model and self.intensity == intensity and self.z == z


@dataclass
class Session:
    """One user's scan, objects and pending box corners, and the embedding of the slice boxes are drawn on."""

    scan: Scan | None = None
    objects: list[SegmentedObject] = field(default_factory=list)
    corners: list[tuple[int, int]] = field(default_factory=list)  # x, y of the box being drawn
    embedding: SliceEmbedding | None = field(default=None, repr=False)

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """The drawn box ``x0, y0, x1, y1`` (inclusive pixels) once both corners are set."""
        if len(self.corners) < 2:
            return None
        (xa, ya), (xb, yb) = self.corners
        return min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)

    def label_map(self) -> LabelMap:
        if self.scan is None or not self.objects:
            raise ValueError("nothing to export yet: segment at least one object")
        masks = np.stack([o.mask for o in self.objects])
        scores = np.stack([o.scores for o in self.objects])
        return LabelMap(resolve_overlaps(masks, scores), [o.name for o in self.objects], scores)

    def slice_labels(self, z: int) -> np.ndarray:
        """The label map of slice ``z`` alone (what the page shows), without resolving the whole volume."""
        if not self.scan.is_volume:
            return self.label_map().labels
        masks = np.stack([o.mask[z : z + 1] for o in self.objects])
        return resolve_overlaps(masks, np.stack([o.scores[z : z + 1] for o in self.objects]))[0]


def open_scan(paths: list[str] | str) -> Scan:
    """Open an uploaded volume, 2D image, zip of a DICOM series, or several DICOM files of one series."""
    from modeling_dbsam.dicom import unpack_dicom_zip
    from modeling_dbsam.inference import check_volume
    from modeling_dbsam.io import path_suffix, read_image

    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise ValueError("no file given")
    name, note, folder, source = Path(paths[0]).name, "", None, None
    if len(paths) == 1 and path_suffix(paths[0]) == ".zip":
        folder = tempfile.mkdtemp(prefix="dbsam-app-")
        try:
            source, note = unpack_dicom_zip(paths[0], folder)
        except ValueError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        target = source
    elif len(paths) > 1:
        folder = tempfile.mkdtemp(prefix="dbsam-app-")
        for index, path in enumerate(paths):
            shutil.copy(path, os.path.join(folder, f"{index:05d}{Path(path).suffix}"))
        name, source, target = f"{len(paths)} files", folder, folder
    else:
        target = paths[0]
        source = target if path_suffix(target) == ".dcm" or os.path.isdir(target) else None
    try:
        image = read_image(target)
        array = image.array
        if image.is_volume:
            channels = image.reference.GetNumberOfComponentsPerPixel()
            if channels > 1:
                raise ValueError(f"{name}: a volume with {channels} channels per voxel; need one (grayscale)")
            check_volume(array)
        else:
            if array.ndim == 4 and len(array) == 1:  # a one-slice multi-channel file (e.g. an RGB DICOM)
                array = array[0]
            to_model_rgb(array, IntensityConfig())  # refuses shapes the model cannot take
    except ValueError as error:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise ValueError(str(error).replace(str(target), name)) from None
    return Scan(array, image.reference, image.is_volume, name, source, note, folder)


def display_intensity(choice: str, model_intensity: IntensityConfig) -> IntensityConfig:
    """The model's rule, or a named CT window preset for display."""
    if choice == MODEL_WINDOW:
        return model_intensity
    if choice not in CT_WINDOW_PRESETS:
        raise ValueError(f"unknown window {choice!r}; choose {MODEL_WINDOW!r} or one of {sorted(CT_WINDOW_PRESETS)}")
    return IntensityConfig("CT", choice)


def display_scale(plane_shape: tuple[int, int]) -> int:
    return max(1, DISPLAY_SIDE // max(plane_shape))


def render(session: Session, z: int, intensity: IntensityConfig) -> np.ndarray:
    """Slice ``z`` as RGB, enlarged by :func:`display_scale`, objects blended in their colours, the box in yellow."""
    scan = session.scan
    z = check_slice(scan, z)
    pixels = scan.shown(intensity)[z]
    rgb = np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels
    rgb = rgb.astype(np.float32)
    if session.objects:
        plane = session.slice_labels(z)
        for value in np.unique(plane[plane > 0]):
            inside = plane == value
            rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * np.array(object_colour(int(value)))
    scale = display_scale(scan.plane_shape)
    shown = np.repeat(np.repeat(rgb.round().astype(np.uint8), scale, axis=0), scale, axis=1)
    for x, y in session.corners[:1] if session.box is None else []:
        shown[y * scale : (y + 1) * scale, x * scale : (x + 1) * scale] = (255, 255, 0)
    if session.box is not None:
        x0, y0, x1, y1 = (v * scale for v in session.box)
        x1, y1 = x1 + scale - 1, y1 + scale - 1
        for rows, cols in ((slice(y0, y0 + 2), slice(x0, x1 + 1)), (slice(y1 - 1, y1 + 1), slice(x0, x1 + 1)),
                           (slice(y0, y1 + 1), slice(x0, x0 + 2)), (slice(y0, y1 + 1), slice(x1 - 1, x1 + 1))):  # fmt: skip
            shown[rows, cols] = (255, 255, 0)
    return shown


def check_slice(scan: Scan | None, z: int) -> int:
    if scan is None:
        raise ValueError("open a scan first")
    if z != int(z) or not 0 <= z < scan.depth:
        raise ValueError(f"slice {z} lies outside the scan's slices 0..{scan.depth - 1}")
    return int(z)


def click(session: Session, x_shown: float, y_shown: float) -> str:
    """Record a click on the shown (enlarged) slice as a box corner; a third click starts a new box."""
    if session.scan is None:
        raise ValueError("open a scan first")
    scale = display_scale(session.scan.plane_shape)
    height, width = session.scan.plane_shape
    x, y = int(x_shown) // scale, int(y_shown) // scale
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"the click at pixel ({x}, {y}) lies outside the image of width {width} and height {height}")
    if len(session.corners) != 1:
        session.corners = []
    session.corners.append((x, y))
    if session.box is None:
        return f"first corner at x={x}, y={y}; click the opposite corner"
    x0, y0, x1, y1 = session.box
    return f"box x={x0}..{x1}, y={y0}..{y1}; name the object and press Segment"


def set_box(session: Session, box: list[float]) -> None:
    """Set the box directly (``x0, y0, x1, y1``), as the API does."""
    if len(box) != 4:
        raise ValueError(f"a box needs 4 values x0, y0, x1, y1; got {box}")
    session.corners = [(int(box[0]), int(box[1])), (int(box[2]), int(box[3]))]


def uses_slice_embedding(scan: Scan, mode: str) -> bool:
    """Whether segmenting in ``mode`` reads the shown slice's embedding alone (a slice, or a 2D image)."""
    return mode == "slice" or not scan.is_volume


def slice_embedding(session: Session, model, processor, model_intensity: IntensityConfig, z: int) -> EncodedImages:
    """Slice ``z``'s image embedding, computed once: every further box on that slice runs only the prompt
    decoder, as in SAM's interactive predictor. One slice is kept; another slice, scan, model or intensity
    rule of the model computes a new one. (The display window does not change what the model sees.)
    """
    scan = session.scan
    z = check_slice(scan, z)
    cached = session.embedding
    if cached is None or not cached.is_for(scan, model, model_intensity, z):
        encoded = encode_slices(model, processor, [scan.shown(model_intensity)[z]])
        session.embedding = cached = SliceEmbedding(scan, model, model_intensity, z, encoded)
    return cached.encoded


def segment(
    session: Session,
    model,
    processor,
    model_intensity: IntensityConfig,
    name: str,
    mode: str,
    z: int,
    z_range: tuple[int, int] | None = None,
    progress: bool = False,
) -> SegmentedObject:
    """Segment the drawn box as a new object named ``name`` and add it to the session."""
    scan = session.scan
    z = check_slice(scan, z)
    box = session.box
    if box is None:
        raise ValueError("draw a box first: click two opposite corners on the image")
    x0, y0, x1, y1 = box
    if x0 == x1 or y0 == y1:
        raise ValueError(f"the box x={x0}..{x1}, y={y0}..{y1} has zero area; click two corners apart in x and y")
    name = (name or "").strip() or f"object {len(session.objects) + 1}"
    if name in (o.name for o in session.objects):
        raise ValueError(f"an object named {name!r} exists; choose another name or remove it first")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not scan.is_volume:
        prompt = ObjectPrompt(name, box)
    elif mode == "propagate":
        prompt = ObjectPrompt(name, box, key_slice=z)
    else:
        z0, z1 = (z, z) if mode == "slice" else z_range
        prompt = ObjectPrompt(name, (x0, y0, z0, x1, y1, z1))
    embeddings = None
    if uses_slice_embedding(scan, mode):
        embeddings = {z: slice_embedding(session, model, processor, model_intensity, z)}
    shown = scan.shown(model_intensity)  # the model's uint8 values, computed once per scan and rule
    result = segment_objects(
        model,
        processor,
        shown if scan.is_volume else shown[0],
        [prompt],
        is_volume=scan.is_volume,
        intensity=model_intensity,
        progress=progress,
        embeddings=embeddings,
    )
    added = SegmentedObject(name, prompt, result.labels == 1, result.scores[0])
    session.objects.append(added)
    session.corners = []
    return added


def remove(session: Session, name: str | None = None) -> str:
    """Remove the named object, or the last one (undo)."""
    if not session.objects:
        raise ValueError("no object to remove")
    names = [o.name for o in session.objects]
    if name is None:
        name = names[-1]
    if name not in names:
        raise ValueError(f"no object named {name!r}; objects: {', '.join(names)}")
    session.objects.pop(names.index(name))
    return f"removed {name!r}"


def export(session: Session, file_format: str, folder: str) -> tuple[str, str]:
    """Write the label map in the scan's geometry (or as DICOM-SEG) and its sidecar JSON into ``folder``."""
    from modeling_dbsam.dicom import check_dicom_seg_source, write_dicom_seg
    from modeling_dbsam.io import write_mask
    from modeling_dbsam.objects import write_legend

    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {file_format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    label_map = session.label_map()
    scan = session.scan
    stem = Path(scan.name).name.split(".")[0] or "scan"
    legend = os.path.join(folder, f"{stem}-labels.json")
    if file_format == "DICOM-SEG":
        if scan.dicom_source is None:
            raise ValueError(f"DICOM-SEG needs a DICOM input; {scan.name} is not DICOM: export .nii.gz or .nrrd")
        check_dicom_seg_source(scan.dicom_source)
        path = os.path.join(folder, f"{stem}-seg.dcm")
        write_dicom_seg(path, label_map, scan.dicom_source)
    else:
        path = os.path.join(folder, f"{stem}-labels{file_format}")
        write_mask(path, label_map.labels, scan.reference)
    write_legend(legend, label_map)
    return path, legend


def objects_table(session: Session) -> list[list]:
    """One row per object: value, name, colour, voxels after overlaps, how it was prompted."""
    if not session.objects:
        return []
    label_map = session.label_map()
    rows = []
    for entry, segmented in zip(label_map.legend()["objects"], session.objects):
        prompt = segmented.prompt
        how = f"key slice {prompt.key_slice}" if prompt.key_slice is not None else f"box {list(map(int, prompt.box))}"
        rows.append(
            [entry["value"], entry["name"], "#{:02x}{:02x}{:02x}".format(*entry["color"]), entry["voxels"], how]
        )
    return rows
