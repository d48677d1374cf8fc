"""Broken inputs on purpose: truncated files, non-finite voxels, outputs that would lose data, empty masks,
and the start-up cost of the package and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny import save_tiny_dbsam

from modeling_dbsam.cli import main
from modeling_dbsam.data import prepare_raw_dataset
from modeling_dbsam.intensity import percentile_rule, to_uint8
from modeling_dbsam.io import read_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dbsam(tmp_path_factory.mktemp("model"), modality="MR")


def mr_volume(shape=(6, 40, 48)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 800 + 100).astype(np.float32)


def write(array: np.ndarray, path) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


def cut(path, keep: float = 0.6) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


# --- truncated and corrupt files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.mha"])
def test_truncated_file_is_refused_naming_it(tmp_path, name):
    path = write(mr_volume(), tmp_path / name)
    assert read_image(path).array.shape == (6, 40, 48)
    cut(path)
    with pytest.raises(ValueError, match=rf"{name}: (truncated|corrupt or truncated gzip)"):
        read_image(path)


def test_gzip_with_a_bad_crc_is_refused(tmp_path):
    path = tmp_path / "scan.nii.gz"
    write(mr_volume(), path)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # the CRC32 in the gzip trailer
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC check failed"):
        read_image(path)


def test_segment_refuses_a_truncated_nifti(tmp_path, model_dir, capsys):
    scan = write(mr_volume(), tmp_path / "scan.nii.gz")
    cut(scan)
    argv = ["segment", scan, "--model", model_dir, "--box", "5,5,1,30,30,4", "--output", str(tmp_path / "m.nii.gz")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "scan.nii.gz: corrupt or truncated gzip data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.nii.gz").exists()


def test_prepare_data_skips_and_lists_a_truncated_case(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    labels = np.zeros((6, 40, 48), np.uint8)
    labels[:, 10:30, 10:30] = 1
    for case in ("good", "cut"):
        write(mr_volume(), raw / "imagesTr" / f"{case}_0000.nii.gz")
        write(labels, raw / "labelsTr" / f"{case}.nii.gz")
    cut(raw / "imagesTr" / "cut_0000.nii.gz")
    report = prepare_raw_dataset(raw, tmp_path / "out", modality="MR", size=None, split="1,0,0")
    assert report.cases["train"] == 1
    assert len(report.skipped) == 1 and "cut_0000.nii.gz: corrupt or truncated gzip" in report.skipped[0]
    assert "cut_0000.nii.gz" in report.summary()


# --- non-finite voxels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_voxel_does_not_blank_the_scan(bad):
    volume = mr_volume()
    spoiled = volume.copy()
    spoiled[2, 3, 4] = bad
    finite = np.isfinite(spoiled)
    expected = percentile_rule(volume[finite])(volume)  # the rule fitted on the finite voxels only
    out = to_uint8(spoiled, "MR")
    assert np.array_equal(out[finite], expected[finite]) and out.max() == 255
    assert out[2, 3, 4] == (255 if bad == np.inf else 0)
    ct = to_uint8(spoiled, "CT", (500, 800))
    assert np.array_equal(ct[finite], to_uint8(volume, "CT", (500, 800))[finite])


def test_an_all_nan_scan_is_refused():
    with pytest.raises(ValueError, match="no finite value"):
        to_uint8(np.full((2, 4, 4), np.nan, np.float32), "MR")


def test_segment_reports_nan_voxels(tmp_path, model_dir, capsys):
    volume = mr_volume()
    volume[0, 0, 0] = np.nan
    scan = write(volume, tmp_path / "scan.mha")  # SimpleITK's NIfTI reader itself turns NaN into 0
    argv = ["segment", scan, "--model", model_dir, "--box", "5,5,1,30,30,4", "--output", str(tmp_path / "m.nii.gz")]
    assert main(argv) == 0
    assert "1 NaN and 0 infinite values" in capsys.readouterr().err


# --- empty masks ---------------------------------------------------------------------------------------------


def test_segment_warns_when_the_mask_is_empty_and_says_why(tmp_path, model_dir, capsys, monkeypatch):
    import modeling_dbsam.inference

    seen = []

    def finds_nothing(model, processor, volume, *args, intensity=None, **kwargs):
        seen.append(intensity.to_uint8(volume))
        return np.zeros(volume.shape, np.uint8)

    monkeypatch.setattr(modeling_dbsam.inference, "segment_volume", finds_nothing)
    scan = write(np.full((4, 32, 32), 7.0, np.float32), tmp_path / "flat.nii.gz")
    out, overlay = tmp_path / "m.nii.gz", tmp_path / "m.png"
    argv = ["segment", scan, "--model", model_dir, "--box", "5,5,1,20,20,2", "--output", str(out)]
    assert main([*argv, "--overlay", str(overlay)]) == 0
    err = capsys.readouterr().err
    assert "warning: the mask is empty: the image is constant (0 everywhere)" in err and not seen[0].any()
    textured = write(mr_volume((4, 32, 32)), tmp_path / "textured.nii.gz")
    assert main(["segment", textured, *argv[2:], "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "warning: the mask is empty: the model found no object in the box" in err
    assert "records no intensity rule" not in err  # model_dir says MR
    plain = save_tiny_dbsam(tmp_path / "plain")  # a processor without a rule
    assert main(["segment", textured, "--model", plain, *argv[4:], "--overwrite"]) == 0
    assert f"note: {plain} records no intensity rule" in capsys.readouterr().err
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out))).any()


def test_overlay_of_an_empty_mask_says_so():
    from modeling_dbsam.inference import overlay_montage

    image = (np.arange(32 * 32).reshape(32, 32) % 200).astype(np.uint8)
    empty = overlay_montage(image, np.zeros((32, 32), bool))
    plain = overlay_montage(image, np.pad(np.ones((8, 8), bool), 12))
    red = (empty[..., 0] > 200) & (empty[..., 1] < 100) & (empty[..., 2] < 100)
    assert red.sum() > 20 and not ((plain[..., 0] > 200) & (plain[..., 1] < 100) & (plain[..., 2] < 100)).any()


# --- output paths ----------------------------------------------------------------------------------------------


def test_output_equal_to_the_input_is_refused_even_with_overwrite(tmp_path, model_dir, capsys):
    scan = write(mr_volume(), tmp_path / "scan.nii.gz")
    before = Path(scan).read_bytes()
    (tmp_path / "link.nii.gz").symlink_to(scan)
    for output in (scan, str(tmp_path / "link.nii.gz"), str(tmp_path / "sub" / ".." / "scan.nii.gz")):
        (tmp_path / "sub").mkdir(exist_ok=True)
        argv = ["segment", scan, "--model", model_dir, "--box", "5,5,1,30,30,4", "--output", output, "--overwrite"]
        assert main(argv) == 2, output
        assert "refusing to replace the input" in capsys.readouterr().err
    assert Path(scan).read_bytes() == before


def test_output_naming_a_folder_is_refused(tmp_path, model_dir, capsys):
    scan = write(mr_volume(), tmp_path / "scan.nii.gz")
    (tmp_path / "out.nii.gz").mkdir()
    argv = ["segment", scan, "--model", model_dir, "--box", "5,5,1,30,30,4", "--output", str(tmp_path / "out.nii.gz")]
    assert main([*argv, "--overwrite"]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


# --- start-up ----------------------------------------------------------------------------------------------------


def _loaded_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, encoding="utf-8", errors="replace", timeout=120
    )
    return set(result.stdout.split())


HEAVY = {"torch", "SimpleITK", "transformers", "datasets", "matplotlib"}


def test_import_and_cli_help_and_argument_errors_stay_light():
    assert not HEAVY & _loaded_after("import modeling_dbsam")
    help_run = "from modeling_dbsam.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert not HEAVY & _loaded_after(help_run)
    bad_args = (
        "from modeling_dbsam.cli import main\ntry:\n    main(['segment', 'x.nii.gz'])\nexcept SystemExit:\n    pass"
    )
    assert not HEAVY & _loaded_after(bad_args)


def test_auto_classes_and_pipeline_find_dbsam_after_a_light_import():
    loaded = _loaded_after(
        """
        import modeling_dbsam
        from transformers import AutoConfig, AutoModelForMaskGeneration
        from transformers.pipelines import PIPELINE_REGISTRY
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASK_GENERATION_MAPPING
        config = AutoConfig.for_model("dbsam")
        assert type(config).__name__ == "DBSamConfig", type(config)
        assert MODEL_FOR_MASK_GENERATION_MAPPING[type(config)].__name__ == "DBSamModel"
        assert "promptable-mask-generation" in PIPELINE_REGISTRY.supported_tasks
        print("REGISTERED")
        """
    )
    assert "REGISTERED" in loaded


# --- damaged model folders ------------------------------------------------------------------------------------


def damaged_copy(model_dir, tmp_path, damage) -> str:
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(model_dir, folder)
    damage(folder)
    return str(folder)


DAMAGES = {
    "truncated weights": (lambda f: cut(f / "model.safetensors", 0.5), r"model.safetensors: truncated"),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), r"model.safetensors: empty"),
    "missing weights": (lambda f: (f / "model.safetensors").unlink(), r"no model weights"),
    "bad config": (lambda f: (f / "config.json").write_text("{not json"), r"config.json: not valid JSON"),
    "bad processor": (
        lambda f: (f / "processor_config.json").write_text('{"image_processor": '),
        r"processor_config.json: not valid JSON",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_model_folder_is_one_line_naming_the_file(model_dir, tmp_path, capsys, damage):
    from modeling_dbsam.model_folder import ModelFolderError, load_model
    from modeling_dbsam.pipelines import load_pipeline
    from modeling_dbsam.processing import load_processor

    spoil, message = DAMAGES[damage]
    folder = damaged_copy(model_dir, tmp_path, spoil)
    scan = write(mr_volume(), tmp_path / "scan.nii.gz")
    argv = ["segment", scan, "--model", folder, "--box", "5,5,1,30,30,4", "--output", str(tmp_path / "m.nii.gz")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and err.startswith("dbsam segment: error: --model ")
        and message.split(":")[0] in err
    )
    with pytest.raises(ModelFolderError, match=message):
        load_pipeline(folder)
    loaders = [load_processor] if damage == "bad processor" else [load_model]
    for loader in loaders:
        with pytest.raises(ModelFolderError, match=message):
            loader(folder)


def test_missing_model_folder_is_named_not_taken_for_a_hub_id(tmp_path):
    from modeling_dbsam.model_folder import ModelFolderError
    from modeling_dbsam.pipelines import load_pipeline

    for name in ("missing/", str(tmp_path / "nowhere"), "./nowhere"):
        with pytest.raises(ModelFolderError, match="no such model folder"):
            load_pipeline(name)


def test_hub_id_offline_is_one_line_saying_what_was_tried(tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    scan = write(mr_volume(), tmp_path / "scan.nii.gz")
    argv = [
        "segment",
        scan,
        "--model",
        "someone/dbsam-model",
        "--box",
        "5,5,1,30,30,4",
        "--output",
        str(tmp_path / "m.nii.gz"),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "modeling_dbsam.cli", *argv],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if "it/s]" not in line]
    assert (
        len(lines) == 1
        and "someone/dbsam-model: not a local folder, and loading it from the Hugging Face Hub failed" in lines[0]
    )


# --- intensity arguments ----------------------------------------------------------------------------------------


def test_window_alone_means_ct_and_an_unknown_modality_is_refused(tmp_path, model_dir, capsys):
    from modeling_dbsam.cli import build_parser
    from modeling_dbsam.commands.segment import check_request
    from modeling_dbsam.processing import IntensityConfig

    scan = write(mr_volume(), tmp_path / "scan.nii.gz")
    base = ["segment", scan, "--model", model_dir, "--box", "5,5,1,30,30,4", "--output", str(tmp_path / "m.nii.gz")]
    request = check_request(build_parser().parse_args([*base, "--window", "liver"]))
    assert request.intensity == IntensityConfig("CT", "liver")
    request = check_request(build_parser().parse_args([*base, "--window=-600,1500"]))
    assert request.intensity == IntensityConfig("CT", (-600, 1500))
    assert main([*base, "--modality", "TC"]) == 2
    assert "unknown modality 'TC'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown modality 'Foo'"):
        prepare_raw_dataset(tmp_path, tmp_path / "out", modality="Foo")
    segment_help = build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    assert "a negative level needs '=': --window=-600,1500" in " ".join(segment_help.split())
