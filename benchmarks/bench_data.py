"""Data pipeline speed: Arrow + SamBoxTransform against a plain loop over the authors' files, and raw import.

    python benchmarks/bench_data.py                 # all parts, ViT-B processor (1024 px)
    python benchmarks/bench_data.py --quick         # small sizes: checks the script runs

(a) ``loader``: examples per second through load + box jitter + processor, for the same examples:
    - ``plain``: the authors' ``npy_images/*.npz`` + ``npy_gts/*.npy`` read one example at a time, box by
      ``box_prompt``, ``SamProcessor`` per example (what a hand-written ``Dataset.__getitem__`` does);
    - ``arrow-w0`` / ``arrow-w2``: the Arrow dataset from ``load_medsam_dataset`` through
      ``with_transform(SamBoxTransform(...))`` and a ``DataLoader`` (batch 8, ``collate_fn=collate_batch``)
      with 0 and 2 workers; ``-default-collate``: the same with torch's ``default_collate``;
    - ``arrow-uint8-w0`` / ``-w2``: ``SamBoxTransform(..., normalize=False)``, what training uses: uint8
      pixels, normalised on the accelerator by ``SamPixels.normalize`` (not part of the loader's time);
      ``arrow-uint8-iconv-w0`` adds DB-SAM's ``conv_pixel_values`` (I_conv), as training does since it exists;
    Variants run interleaved, repeated; the report gives min and median examples/s, the median ratio
    to ``plain``, and CPU milliseconds per example (the process and its finished workers), which the
    shared machine's load inflates less than wall time.
    Slices are real: axial slices of the mricron brain MR with AAL atlas labels, at 256 x 256.
(b) ``features``: reading the image column as numpy from ``Image()`` (PNG) against a fixed-size
    ``Array3D`` column, and the bytes each takes on disk.
(c) ``processor``: where ``SamImageProcessorPil`` spends its time on one 256 -> 1024 image (cProfile), and
    the CPU cost of SamBoxTransform's steps, with its output written to fresh against reused memory.
(d) ``import``: ``prepare_raw_dataset`` on a synthetic 512 x 512 x 100 CT with 10 labels, in a fresh
    process: seconds, and how far resident memory peaks above its starting point (Linux VmHWM, reset
    before each part) during the import against during just reading the image and label volumes, plus
    tracemalloc's peak of NumPy/Python allocations.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

MR = "/usr/share/mricron/templates/ch2.nii.gz"
ATLAS = "/usr/share/mricron/templates/aal.nii.gz"


def make_npy_layout(folder: Path, slices: int) -> None:
    """The authors' training layout from real brain slices: 256 x 256 x 3 images, label maps of 4 structures."""
    import SimpleITK as sitk
    from PIL import Image

    mr = sitk.GetArrayFromImage(sitk.ReadImage(MR))
    atlas = sitk.GetArrayFromImage(sitk.ReadImage(ATLAS))
    keep = np.isin(atlas, [7, 8, 85, 86]) * atlas
    (folder / "npy_images").mkdir(parents=True)
    (folder / "npy_gts").mkdir()
    for z in np.linspace(60, 120, slices).astype(int):
        image = np.asarray(Image.fromarray(mr[z]).resize((256, 256), Image.Resampling.BICUBIC))
        labels = np.asarray(Image.fromarray(keep[z].astype(np.uint8)).resize((256, 256), Image.Resampling.NEAREST))
        np.savez_compressed(
            folder / "npy_images" / f"MR_Brain_colin-{z:03d}.npz", img=np.repeat(image[..., None], 3, -1)
        )
        np.save(folder / "npy_gts" / f"MR_Brain_colin-{z:03d}.npy", labels)


def plain_loop(folder: Path, processor, limit: int) -> int:
    """The baseline: read the authors' files and run the processor one example at a time."""
    from modeling_dbsam.boxes import box_prompt

    rng, count = np.random.default_rng(0), 0
    for path in sorted((folder / "npy_images").glob("*.npz")):
        image = np.load(path)["img"]
        labels = np.load(folder / "npy_gts" / f"{path.stem}.npy")
        for value in np.unique(labels)[1:]:
            mask = (labels == value).astype(np.uint8)
            box = box_prompt(mask, 20, rng)
            processor(images=[image], input_boxes=[[box.tolist()]], segmentation_maps=[mask], return_tensors="pt")
            count += 1
            if count == limit:
                return count
    return count


def arrow_loop(
    dataset, processor, workers: int, limit: int, join: bool = True, normalize: bool = True, conv_size=None
) -> int:
    import torch

    from modeling_dbsam.data import SamBoxTransform, collate_batch

    transform = SamBoxTransform(processor, max_shift=20, seed=0, normalize=normalize, conv_size=conv_size)
    loader = torch.utils.data.DataLoader(
        dataset.select(range(limit)).with_transform(transform),
        batch_size=8,
        num_workers=workers,
        collate_fn=collate_batch if join else None,
    )
    return sum(len(batch["pixel_values"]) for batch in loader)


def timed(function, *args) -> tuple[float, int]:
    start = time.perf_counter()
    count = function(*args)
    return time.perf_counter() - start, count


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers): the work, whatever the load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_processor(quick: bool):
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import tiny_processor

        return tiny_processor()
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    return SamProcessor(image_processor=SamImageProcessorPil())


def bench_loader(work: Path, slices: int, limit: int, repeats: int, quick: bool) -> dict:
    from modeling_dbsam.data import load_medsam_dataset

    folder, processor = work / "MedSAM-Train", make_processor(quick)
    make_npy_layout(folder, slices)
    seconds, _ = timed(lambda: load_medsam_dataset(folder, cache_dir=str(work / "cache")) and 0)
    dataset = load_medsam_dataset(folder, cache_dir=str(work / "cache"))["train"]
    limit = min(limit, dataset.num_rows)
    conv_size = processor.image_processor.mask_size["longest_edge"]
    variants = {
        "plain": lambda: plain_loop(folder, processor, limit),
        "arrow-w0": lambda: arrow_loop(dataset, processor, 0, limit),
        "arrow-w2": lambda: arrow_loop(dataset, processor, 2, limit),
        "arrow-w0-default-collate": lambda: arrow_loop(dataset, processor, 0, limit, join=False),
        "arrow-w2-default-collate": lambda: arrow_loop(dataset, processor, 2, limit, join=False),
        "arrow-uint8-w0": lambda: arrow_loop(dataset, processor, 0, limit, normalize=False),
        "arrow-uint8-w2": lambda: arrow_loop(dataset, processor, 2, limit, normalize=False),
        # + DB-SAM's I_conv, as training makes it; its side equals the low-res mask's (4x the ViT grid)
        "arrow-uint8-iconv-w0": lambda: arrow_loop(dataset, processor, 0, limit, normalize=False, conv_size=conv_size),
    }
    rates, cpu_ms = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            cpu = cpu_seconds()
            elapsed, count = timed(run)
            assert count == limit, (name, count)
            rates[name].append(count / elapsed)
            cpu_ms[name].append((cpu_seconds() - cpu) / count * 1e3)
    plain = statistics.median(rates["plain"])
    return {
        "examples": limit,
        "npy_to_arrow_examples_per_s": round(dataset.num_rows / seconds, 1),
        **{
            name: {
                "examples_per_s_min_median": [round(min(rates[name]), 1), round(statistics.median(rates[name]), 1)],
                "cpu_ms_per_example_min_median": [
                    round(min(cpu_ms[name]), 1),
                    round(statistics.median(cpu_ms[name]), 1),
                ],
                "median_ratio_to_plain": round(statistics.median(rates[name]) / plain, 2),
            }
            for name in variants
        },
    }


def bench_features(work: Path, count: int, repeats: int) -> dict:
    """Read ``count`` images as numpy from a PNG ``Image()`` column and from an ``Array3D`` column."""
    import datasets

    from modeling_dbsam.data import load_medsam_dataset

    rows = load_medsam_dataset(work / "MedSAM-Train", cache_dir=str(work / "cache"))["train"]
    count = min(count, rows.num_rows)
    images = [np.asarray(rows[i]["image"]) for i in range(count)]
    png = rows.select(range(count)).select_columns(["image"])
    array = datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Array3D(images[0].shape, "uint8")})
    ).with_format("numpy")
    sizes = {}
    for name, dataset in (("png", png.flatten_indices()), ("array3d", array)):
        dataset.save_to_disk(str(work / name))
        sizes[name] = sum(p.stat().st_size for p in (work / name).glob("*.arrow"))

    def read_png():
        return [np.asarray(png[i]["image"]) for i in range(count)]

    def read_array():
        return [array[i]["image"] for i in range(count)]

    times = {"png": [], "array3d": []}
    for _ in range(repeats):
        for name, read in (("png", read_png), ("array3d", read_array)):
            elapsed, _ = timed(lambda read=read: len(read()))
            times[name].append(elapsed / count * 1e3)
    return {
        "ms_per_image": {
            n: {"min": round(min(t), 3), "median": round(statistics.median(t), 3)} for n, t in times.items()
        },
        "bytes_per_image": {n: round(s / count) for n, s in sizes.items()},
    }


def bench_processor(processor) -> dict:
    """cProfile of the processor on one 256 x 256 image with a mask: the top functions by own time."""
    image = np.repeat(np.random.default_rng(0).integers(0, 256, (256, 256, 1), dtype=np.uint8), 3, -1)
    mask = np.zeros((256, 256), np.uint8)
    mask[50:100, 60:120] = 1
    processor(images=[image], segmentation_maps=[mask], return_tensors="pt")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(5):
        processor(images=[image], input_boxes=[[[60, 50, 120, 100]]], segmentation_maps=[mask], return_tensors="pt")
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt / 5
    top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:6]
    return {
        "ms_per_image": round(total * 1e3, 1),
        "top_own_time_ms": {f"{key[2]} ({Path(key[0]).name})": round(value[2] / 5 * 1e3, 1) for key, value in top},
    }


def bench_transform_parts(processor, repeats: int) -> dict:
    """CPU ms per 256 x 256 gray example of the pixel steps, writing into fresh memory (a new batch tensor,
    as every batch needs) against memory written before (page faults): the uint8 write is what
    ``normalize=False`` leaves to a loader worker, the table lookup what it moves to the accelerator."""
    import torch
    from PIL import Image

    from modeling_dbsam.pixels import SamPixels

    table = SamPixels(processor).table
    plane = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    side = processor.image_processor.size["longest_edge"]
    resized = torch.from_numpy(
        np.array(Image.fromarray(plane).resize((side, side), processor.image_processor.resample))
    )
    indices = resized.view(-1).int()
    reused_float, reused_uint8 = torch.empty(3, side * side), torch.empty(3, side * side, dtype=torch.uint8)

    def lookup(target):
        for channel in range(3):
            torch.index_select(table[channel], 0, indices, out=target[channel])

    def write_uint8(target):
        target.copy_(resized.view(1, -1).expand(3, -1))

    steps = {
        "resize (PIL, one channel)": lambda: Image.fromarray(plane).resize(
            (side, side), processor.image_processor.resample
        ),
        "uint8 write into reused memory": lambda: write_uint8(reused_uint8),
        "uint8 write into fresh memory": lambda: write_uint8(torch.empty(3, side * side, dtype=torch.uint8)),
        "lookup into reused memory": lambda: lookup(reused_float),
        "lookup into fresh memory": lambda: lookup(torch.empty(3, side * side)),
    }
    result = {}
    for name, step in steps.items():
        step()
        cpu = cpu_seconds()
        for _ in range(8 * repeats):
            step()
        result[name] = round((cpu_seconds() - cpu) / (8 * repeats) * 1e3, 2)
    return result


def make_ct_case(folder: Path, depth: int, side: int, labels: int) -> int:
    """A synthetic CT (int16 HU) with ``labels`` ellipsoids, in the nnU-Net layout; returns the image's bytes."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    volume = rng.normal(40, 300, (depth, side, side)).astype(np.int16)
    label_map = np.zeros((depth, side, side), np.uint8)
    z, y, x = np.ogrid[:depth, :side, :side]
    for value in range(1, labels + 1):
        cz, cy, cx = rng.uniform(0.2, 0.8, 3) * (depth, side, side)
        rz, ry, rx = rng.uniform(0.08, 0.2, 3) * (depth, side, side)
        label_map[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = value
    for kind, array, name in (("images", volume, "ct_0000"), ("labels", label_map, "ct")):
        (folder / f"{kind}Tr").mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(folder / f"{kind}Tr" / f"{name}.nii.gz"))
    return volume.nbytes + label_map.nbytes


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _peak_growth_mib(function) -> float:
    """How far the resident memory peaks above where it stands, while ``function`` runs (Linux)."""
    gc.collect()
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    function()
    return round(_status_mib("VmHWM") - before, 1)


def run_import(raw: Path, out: Path) -> dict:
    """Runs inside a fresh process (``--import-child``): reading the case alone, then the whole import."""
    from modeling_dbsam.data import prepare_raw_dataset
    from modeling_dbsam.io import read_image

    def read_only():
        image, label = read_image(raw / "imagesTr" / "ct_0000.nii.gz"), read_image(raw / "labelsTr" / "ct.nii.gz")
        return image.array.nbytes + label.array.nbytes

    read_growth = _peak_growth_mib(read_only)
    result = {}

    def run():
        tracemalloc.start()
        start = time.perf_counter()
        report = prepare_raw_dataset(raw, out, modality="CT", window=(40, 400), split="1,0,0")
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["tracemalloc_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
        result["examples"] = report.examples["train"]
        result["small_components_dropped"] = report.small_components_dropped_3d + report.small_components_dropped_2d
        result["empty_slices_dropped"] = report.empty_slices_dropped

    result["rss_peak_growth_mib"] = _peak_growth_mib(run)
    result["rss_peak_growth_reading_only_mib"] = read_growth
    return result


def bench_import(work: Path, depth: int, side: int, labels: int) -> dict:
    raw = work / "ct_raw"
    volume_bytes = make_ct_case(raw, depth, side, labels)
    command = [sys.executable, __file__, "--import-child", str(raw), str(work / "ct_out")]
    child = subprocess.run(command, check=True, capture_output=True, encoding="utf-8", errors="replace")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["volume_and_labels_mib"] = round(volume_bytes / 2**20, 1)
    result["shape"] = [depth, side, side]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny processor and small sizes")
    parser.add_argument("--part", choices=["all", "loader", "features", "processor", "import"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--import-child", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.import_child:
        print(json.dumps(run_import(Path(args.import_child[0]), Path(args.import_child[1]))))
        return
    slices, limit, depth, side = (8, 16, 10, 128) if args.quick else (48, 128, 100, 512)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.part in ("all", "loader", "features"):
            results["loader"] = bench_loader(work, slices, limit, args.repeats, args.quick)
        if args.part in ("all", "features"):
            results["features"] = bench_features(work, limit, args.repeats)
        if args.part in ("all", "processor"):
            results["processor"] = bench_processor(make_processor(args.quick))
            results["transform_steps_cpu_ms"] = bench_transform_parts(make_processor(args.quick), args.repeats)
        if args.part in ("all", "import"):
            results["import"] = bench_import(work, depth, side, 10)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
