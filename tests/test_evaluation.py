"""Evaluation: case-level 3D scoring and aggregation with known answers, protocols, resume, refusals, report, CLI."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from tiny import tiny_processor, tiny_sam_config
from transformers import SamModel

from modeling_dbsam import evaluation
from modeling_dbsam.cli import main
from modeling_dbsam.data.schema import FEATURES
from modeling_dbsam.evaluation import PAPER, evaluate_model, get_protocol, load_baseline
from modeling_dbsam.metrics import dice_score, normalized_surface_dice
from modeling_dbsam.predictor import BoxPrediction

SIZE = 256  # the paper grid: no resizing, so boxes and masks below are exact


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model is latency-bound: extra threads only fight over the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rect(top, left, bottom, right, size=SIZE) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top:bottom, left:right] = True
    return mask


def _ell(top, left, bottom, right, size=SIZE) -> np.ndarray:
    """A rectangle missing its top-right quarter: its box prompt is the full rectangle."""
    mask = _rect(top, left, bottom, right, size)
    mask[top : (top + bottom) // 2, (left + right) // 2 : right] = False
    return mask


def _dataset(examples: list[dict], size: int = SIZE) -> datasets.Dataset:
    """Examples in the project's schema; the image's red channel holds the slice index (oracles read it)."""
    rows = {name: [] for name in FEATURES}
    for ex in examples:
        image = np.full((size, size, 3), 40, np.uint8)
        image[..., 0] = ex["slice_index"]
        values = {**ex, "image": image, "mask": ex["mask"].astype(np.uint8)}
        for name in FEATURES:
            rows[name].append(values[name])
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def _example(task, modality, dimension, case_id, slice_index, label, mask, spacing=None) -> dict:
    names = ("task", "modality", "dimension", "case_id", "slice_index", "label", "mask", "spacing")
    return dict(zip(names, (task, modality, dimension, case_id, slice_index, label, mask, spacing)))


class Oracle:
    """Stands in for ``predict_boxes``: the mask is ``rule(slice_index, box)``; records what it was given."""

    def __init__(self, rule):
        self.rule, self.images, self.boxes = rule, [], []

    def __call__(self, model, processor, images, boxes, batch_size=8, autocast_dtype=None):
        results = []
        for image, image_boxes in zip(images, boxes):
            self.images.append(image.shape)
            self.boxes.append(np.asarray(image_boxes))
            masks = np.stack([self.rule(int(image[0, 0, 0]), box, image.shape[:2]) for box in image_boxes])
            results.append(BoxPrediction(masks, np.ones(len(masks), np.float32), np.zeros((len(masks), 4, 4))))
        return results


def _box_interior(slice_index, box, shape, shift=9) -> np.ndarray:
    """Undo the +9 px box shift: the tight box of the ground truth, filled."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros(shape, bool)
    mask[y0 + shift : y1 - shift + 1, x0 + shift : x1 - shift + 1] = True
    return mask


INFO = {
    "model_info": {"name": "oracle", "path": "/m", "fingerprint": "f"},
    "data_info": {"path": "/d", "split": "test"},
}


def _run(dataset, protocol, output, rule=_box_interior, monkeypatch=None, **kwargs):
    oracle = Oracle(rule)
    monkeypatch.setattr(evaluation, "predict_boxes", oracle)
    info = {**INFO, **kwargs.pop("info", {})}
    results = evaluate_model(lambda: (None, None), dataset, protocol, output, **info, **kwargs)
    return results, oracle


# ---------------------------------------------------------------------------------------------
# Case-level scoring and aggregation, known answers
# ---------------------------------------------------------------------------------------------

RECT_A, ELL_A = (40, 50, 100, 120), (130, 60, 200, 160)
ELL_B, ELL_B2, ELL_E = (30, 30, 90, 110), (34, 28, 96, 104), (60, 60, 140, 170)


def _hand_dataset() -> datasets.Dataset:
    liver, prostate, lungs = ("CT Liver", "CT", "3D"), ("MR Prostate", "MR", "3D"), ("X-Ray Lungs", "X-Ray", "2D")
    examples = [
        # Case A, label 1: perfect on slices 3, 4, 6 (slice 5 has no example); label 2: L-shapes on 3, 4.
        *[_example(*liver, "A", z, 1, _rect(*RECT_A)) for z in (3, 4, 6)],
        *[_example(*liver, "A", z, 2, _ell(*ELL_A)) for z in (3, 4)],
        # Case B: one L-shaped object on slices 0 and 2 (gap at 1).
        _example(*liver, "B", 0, 1, _ell(*ELL_B)),
        _example(*liver, "B", 2, 1, _ell(*ELL_B2)),
        _example(*prostate, "E", 7, 1, _ell(*ELL_E)),
        # 2D: case C has two objects on one image, case D one.
        _example(*lungs, "C", 0, 1, _rect(*RECT_A)),
        _example(*lungs, "C", 0, 2, _ell(*ELL_A)),
        _example(*lungs, "D", 0, 1, _ell(*ELL_B)),
    ]
    return _dataset(examples)


def _scores(pred, gt) -> np.ndarray:
    return np.array([dice_score(pred, gt), normalized_surface_dice(pred, gt, (1.0,) * gt.ndim, 1.0)])


def _bounding(box) -> np.ndarray:
    return _rect(*box)


def test_aggregation_of_a_hand_built_two_task_dataset(tmp_path, monkeypatch):
    results, oracle = _run(_hand_dataset(), PAPER, tmp_path / "out", monkeypatch=monkeypatch)
    # The oracle's prediction for an L-shape is its bounding rectangle; rectangles come back exact.
    ell_a = _scores(np.stack([_bounding(ELL_A)] * 2), np.stack([_ell(*ELL_A)] * 2))
    empty = np.zeros((SIZE, SIZE), bool)
    case_b_gt = np.stack([_ell(*ELL_B), empty, _ell(*ELL_B2)])
    case_b_pred = np.stack([_bounding(ELL_B), empty, _bounding(ELL_B2)])
    case_a, case_b = (np.ones(2) + ell_a) / 2, _scores(case_b_pred, case_b_gt)
    liver = (case_a + case_b) / 2
    prostate = _scores(_bounding(ELL_E)[None], _ell(*ELL_E)[None])
    lungs = ((np.ones(2) + _scores(_bounding(ELL_A), _ell(*ELL_A))) / 2 + _scores(_bounding(ELL_B), _ell(*ELL_B))) / 2

    tasks = {t["task"]: t for t in results["tasks"]}
    for name, expected in (("CT Liver", liver), ("MR Prostate", prostate), ("X-Ray Lungs", lungs)):
        assert [tasks[name]["dsc"], tasks[name]["nsd"]] == pytest.approx(expected, abs=1e-12), name
    assert (tasks["CT Liver"]["cases"], tasks["CT Liver"]["slices"], tasks["CT Liver"]["objects"]) == (2, 5, 3)
    assert (tasks["X-Ray Lungs"]["cases"], tasks["X-Ray Lungs"]["slices"], tasks["X-Ray Lungs"]["objects"]) == (
        2,
        2,
        3,
    )
    # Unweighted over tasks: Liver's two cases count as much as Prostate's one.
    average_3d = results["averages"]["3D"]
    assert [average_3d["dsc"], average_3d["nsd"]] == pytest.approx((liver + prostate) / 2, abs=1e-12)
    assert (average_3d["tasks"], average_3d["cases"], average_3d["slices"]) == (2, 3, 6)
    assert [results["averages"]["2D"]["dsc"], results["averages"]["2D"]["nsd"]] == pytest.approx(lungs, abs=1e-12)
    # The gap plane matters: stacking case B's two slices contiguously would give another NSD.
    assert _scores(case_b_pred[[0, 2]], case_b_gt[[0, 2]])[1] != pytest.approx(case_b[1], abs=1e-6)
    # One encoder image per slice, with all of its boxes: 3D slices A 3, 4, 6; B 0, 2; E 7; 2D images C, D.
    assert len(oracle.images) == 8 and sorted(len(b) for b in oracle.boxes) == [1] * 5 + [2] * 3


def test_case_score_is_the_mean_over_its_objects_and_task_score_the_mean_over_cases():
    obj = evaluation.ObjectScore
    cases = [
        evaluation.CaseResult(
            "a", [obj("T", "CT", "3D", 1, 2, 0.2, 0.4, "mm"), obj("T", "CT", "3D", 2, 1, 0.6, 0.8, "mm")]
        ),
        evaluation.CaseResult("b", [obj("T", "CT", "3D", 1, 3, 1.0, 1.0, "mm")]),
        evaluation.CaseResult("c", [obj("U", "US", "2D", 1, 1, 0.5, 0.1, "px")]),
    ]
    for case, slices in zip(cases, ({"T": 2}, {"T": 3}, {"U": 1})):
        case.slices_per_task = slices
    summary = evaluation.aggregate(cases)
    task_t = next(t for t in summary["tasks"] if t["task"] == "T")
    assert (task_t["dsc"], task_t["nsd"]) == pytest.approx(((0.4 + 1.0) / 2, (0.6 + 1.0) / 2))
    assert (task_t["cases"], task_t["slices"], task_t["units"]) == (2, 5, "mm")
    assert summary["averages"]["2D"]["nsd"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


def test_paper_and_physical_protocols_differ_on_an_anisotropic_case(tmp_path, monkeypatch):
    """A cube on slices 2-7 predicted without its first slice: within 1 voxel, but 2.5 mm away."""
    spacing = [2.5, 0.8, 0.8]
    cube = _rect(100, 100, 140, 140)
    dataset = _dataset([_example("CT Liver", "CT", "3D", "A", z, 1, cube, spacing) for z in range(2, 8)])

    def rule(slice_index, box, shape):
        return _box_interior(slice_index, box, shape) if slice_index > 2 else np.zeros(shape, bool)

    paper, _ = _run(dataset, PAPER, tmp_path / "paper", rule, monkeypatch)
    physical, _ = _run(dataset, get_protocol("physical", 1.0), tmp_path / "physical", rule, monkeypatch)
    gt = np.stack([cube] * 6)
    pred = gt.copy()
    pred[0] = False
    assert paper["tasks"][0]["dsc"] == physical["tasks"][0]["dsc"] == pytest.approx(10 / 11)
    assert paper["tasks"][0]["nsd"] == 1.0  # every surfel within 1 voxel
    expected = normalized_surface_dice(pred, gt, tuple(spacing), 1.0)
    assert physical["tasks"][0]["nsd"] == pytest.approx(expected) and expected < 0.95
    assert physical["protocol"]["tolerance_unit"] == "mm" and paper["protocol"]["tolerance_unit"] == "px"


def test_box_rule_and_grid_per_protocol(tmp_path, monkeypatch):
    """Paper: image and mask resized to 256, box +9 px. Physical: own 64 px grid, box +9 * 64 / 256 px."""
    mask = _rect(20, 10, 40, 30, size=64)
    dataset = _dataset([_example("US Breast", "Ultrasound", "2D", "A", 0, 1, mask, [0.5, 0.5])], size=64)
    _, paper = _run(dataset, PAPER, tmp_path / "paper", monkeypatch=monkeypatch)
    _, physical = _run(dataset, get_protocol("physical"), tmp_path / "physical", monkeypatch=monkeypatch)
    assert paper.images == [(256, 256, 3)] and physical.images == [(64, 64, 3)]
    assert paper.boxes[0][0] == pytest.approx([40 - 9, 80 - 9, 119 + 9, 159 + 9])
    assert physical.boxes[0][0] == pytest.approx([10 - 2.25, 20 - 2.25, 29 + 2.25, 39 + 2.25])


def test_protocol_arguments_are_checked():
    assert get_protocol("physical", 2.0).tolerance == 2.0
    with pytest.raises(ValueError, match="paper protocol fixes"):
        get_protocol("paper", 2.0)
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("exact")
    with pytest.raises(ValueError, match="tolerance"):
        get_protocol("physical", -1.0)


# ---------------------------------------------------------------------------------------------
# The loop with a real (tiny) model: resume, refusals
# ---------------------------------------------------------------------------------------------


def _tiny_dataset() -> datasets.Dataset:
    examples = []
    for case in ("v1", "v2"):
        for z in range(3):
            examples.append(
                _example("CT Liver", "CT", "3D", case, z, 1, _rect(60 + 5 * z, 50, 150, 170), [3.0, 0.9, 0.9])
            )
    for case in ("p1", "p2"):
        examples.append(_example("Endoscope Polyp", "Endoscope", "2D", case, 0, 1, _ell(*ELL_A), None))
    return _dataset(examples)


class CountingModel:
    """A tiny SamModel whose encoder counts images and can fail after a given number."""

    def __init__(self, fail_after: int | None = None):
        torch.manual_seed(0)
        self.model = SamModel(tiny_sam_config()).eval()
        self.images, self.fail_after = 0, fail_after
        encode = self.model.get_image_embeddings

        def counted(pixel_values, *args, **kwargs):
            if self.fail_after is not None and self.images + len(pixel_values) > self.fail_after:
                raise RuntimeError("simulated crash")
            self.images += len(pixel_values)
            return encode(pixel_values, *args, **kwargs)

        self.model.get_image_embeddings = counted

    def load(self):
        return self.model, tiny_processor()


def _evaluate(counting, dataset, output, protocol=PAPER, **kwargs):
    return evaluate_model(counting.load, dataset, protocol, output, batch_size=1, **INFO, **kwargs)


def test_resume_skips_finished_cases_and_gives_the_same_results(tmp_path):
    dataset = _tiny_dataset()
    full = CountingModel()
    reference = _evaluate(full, dataset, tmp_path / "full")
    assert full.images == 8  # 2 x 3 slices + 2 images, one encoder pass each

    crashing = CountingModel(fail_after=4)  # case v1 (3 slices) finishes, v2 crashes midway
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(crashing, dataset, tmp_path / "resumed")
    lines = (tmp_path / "resumed" / "cases.jsonl").read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == ["v1"]
    with open(tmp_path / "resumed" / "cases.jsonl", "a") as handle:
        handle.write('{"case_id": "v2", "obj')  # a line cut short by the crash

    resumed = CountingModel()
    results = _evaluate(resumed, dataset, tmp_path / "resumed")
    assert resumed.images == 5  # v2's 3 slices and the 2 images: v1 was skipped
    assert results["tasks"] == reference["tasks"] and results["averages"] == reference["averages"]


def test_finished_different_or_foreign_output_is_refused(tmp_path):
    dataset = _tiny_dataset()
    _evaluate(CountingModel(), dataset, tmp_path / "done")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _evaluate(CountingModel(), dataset, tmp_path / "done")
    again = CountingModel()
    _evaluate(again, dataset, tmp_path / "done", overwrite=True)
    assert again.images == 8  # recomputed from scratch

    with pytest.raises(RuntimeError):
        _evaluate(CountingModel(fail_after=4), dataset, tmp_path / "partial")
    with pytest.raises(ValueError, match="different protocol"):
        _evaluate(CountingModel(), dataset, tmp_path / "partial", protocol=get_protocol("physical"))

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by dbsam evaluate"):
        _evaluate(CountingModel(), dataset, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def test_report_has_the_paper_tables_with_one_column_per_model(tmp_path, monkeypatch):
    dataset = _hand_dataset()
    exact_info = {"model_info": {"name": "Exact", "path": "/e", "fingerprint": "1"}}
    exact, _ = _run(dataset, PAPER, tmp_path / "exact", _box_interior, monkeypatch, info=exact_info)
    baseline = load_baseline(tmp_path / "exact" / "results.json", PAPER)

    def loose(slice_index, box, shape):  # 4 px too large on every side
        return _box_interior(slice_index, box, shape, shift=5)

    loose_info = {"model_info": {"name": "Loose", "path": "/l", "fingerprint": "2"}}
    results, _ = _run(dataset, PAPER, tmp_path / "loose", loose, monkeypatch, info=loose_info, baselines=[baseline])
    markdown = (tmp_path / "loose" / "results.md").read_text()
    assert "## Table 1: 3D tasks" in markdown and "## Table 2: 2D tasks" in markdown
    assert markdown.index("Table 1") < markdown.index("| Liver | CT |") < markdown.index("Table 2")
    header = "| Segmentation Task | Modality | DSC (%) Loose | DSC (%) Exact | NSD (%) Loose | NSD (%) Exact | Cases | Slices |"
    assert markdown.count(header) == 2
    assert "Protocol: paper: 256x256 grid, unit spacing, NSD tolerance 1 px" in markdown
    assert "+ 9 px per side at 256 px" in markdown
    liver = {t["task"]: t for t in results["tasks"]}["CT Liver"]
    exact_liver = {t["task"]: t for t in exact["tasks"]}["CT Liver"]
    best_nsd = max(liver["nsd"], exact_liver["nsd"])
    row = next(line for line in markdown.splitlines() if line.startswith("| Liver | CT |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == [
        f"{100 * liver['dsc']:.2f}" if liver["dsc"] < exact_liver["dsc"] else f"**{100 * liver['dsc']:.2f}**",
        f"**{100 * exact_liver['dsc']:.2f}**",
        f"**{100 * liver['nsd']:.2f}**" if liver["nsd"] == best_nsd else f"{100 * liver['nsd']:.2f}",
        f"**{100 * exact_liver['nsd']:.2f}**" if exact_liver["nsd"] == best_nsd else f"{100 * exact_liver['nsd']:.2f}",
    ]
    assert cells[6:] == ["2", "5"]
    average = next(line for line in markdown.splitlines() if line.startswith("| **Average** |"))
    assert f"{100 * results['averages']['3D']['nsd']:.2f}" in average
    csv_rows = (tmp_path / "loose" / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "model,dimension,task,modality,cases,slices,dsc,nsd"
    assert sum(r.startswith("Loose,") for r in csv_rows) == sum(r.startswith("Exact,") for r in csv_rows) == 5
    assert (tmp_path / "loose" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not comparable"):
        load_baseline(tmp_path / "loose" / "results.json", get_protocol("physical"))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_evaluates_a_saved_model_and_dataset(tmp_path, capsys):
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    SamModel(tiny_sam_config()).save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    datasets.DatasetDict({"test": _tiny_dataset()}).save_to_disk(str(data_dir))
    base = ["evaluate", "--model", str(model_dir), "--data", str(data_dir)]
    assert main([*base, "--output", str(tmp_path / "report"), "--device", "cpu"]) == 0
    for name in ("results.json", "results.csv", "results.md", "results.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["model"]["name"] == "model" and results["data"]["cases"] == 4
    assert "3D average over 1 tasks" in capsys.readouterr().out

    assert main([*base, "--output", str(tmp_path / "report")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--split", "validation", "--output", str(tmp_path / "other")]) == 2
    assert "has no split 'validation'" in capsys.readouterr().err
    assert main([*base, "--tolerance", "2", "--output", str(tmp_path / "other")]) == 2
    assert "paper protocol fixes" in capsys.readouterr().err
