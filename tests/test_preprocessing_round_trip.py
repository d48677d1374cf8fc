"""One preprocessing rule from data to use: prepare CT with a window, train, then segment raw HU.

The dataset's card records the rule, training copies it into the processor it saves, and
``dbsam segment`` on the raw volume must feed the model exactly the pixels training fed it.
"""

from __future__ import annotations

import datasets
import numpy as np
import SimpleITK as sitk
import torch
import train
from accelerate.state import AcceleratorState, GradientState
from training_support import write_tiny_model_config

from modeling_dbsam import DBSamModel
from modeling_dbsam.cli import main as dbsam
from modeling_dbsam.data.card import read_preprocessing
from modeling_dbsam.processing import get_intensity_config, load_processor

WINDOW = (-600.0, 1500.0)  # lung: HU 0 -> 230, not what percentile clipping would give


def raw_ct(folder, shape=(4, 32, 32)):
    """A CT volume in HU (air, soft tissue, a bright object) and its label map, in the nnU-Net layout."""
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 40, shape).astype(np.int16)
    hu[:, :, :6] = -1000  # air column
    labels = np.zeros(shape, np.uint8)
    labels[:, 8:24, 10:26] = 1
    hu[labels == 1] += 300
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for name, array in (("imagesTr/lung_0000.nii.gz", hu), ("labelsTr/lung.nii.gz", labels)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
    return folder / "imagesTr" / "lung_0000.nii.gz"


def test_training_records_the_window_and_segment_feeds_the_model_what_training_did(tmp_path, monkeypatch):
    scan = raw_ct(tmp_path / "raw")
    data = tmp_path / "data"
    argv = ["prepare-data", str(tmp_path / "raw"), str(data), "--modality", "CT", "--window=-600,1500"]
    assert dbsam([*argv, "--size", "0", "--min-size", "1", "--split", "1,0,0"]) == 0
    assert read_preprocessing(data) == {"modality": "CT", "intensity_window": list(WINDOW), "image_size": None}

    seen_in_training = []
    forward = DBSamModel.forward

    def recording_forward(self, pixel_values=None, **kwargs):
        seen_in_training.append(pixel_values.detach().clone())
        return forward(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(DBSamModel, "forward", recording_forward)
    model_config = write_tiny_model_config(tmp_path / "model.json")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    code = train.main(
        [*("--model_config", str(model_config), "--data", str(data), "--output_dir", str(tmp_path / "model")),
         *("--report_to", "none", "--disable_tqdm", "--eval_strategy", "no", "--max_steps", "2"),
         *("--per_device_train_batch_size", "4", "--max_box_shift", "0", "--save_strategy", "epoch")]
    )  # fmt: skip
    assert code == 0
    monkeypatch.setattr(DBSamModel, "forward", forward)
    saved = get_intensity_config(load_processor(tmp_path / "model"))
    assert (saved.modality, saved.window) == ("CT", WINDOW)

    seen_in_use = []
    embed = DBSamModel.get_image_embeddings

    def recording_embed(self, pixel_values, *args, **kwargs):
        seen_in_use.append(pixel_values.detach().clone())
        return embed(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(DBSamModel, "get_image_embeddings", recording_embed)
    out = tmp_path / "mask.nii.gz"
    assert dbsam(["segment", str(scan), "--model", str(tmp_path / "model"), "--box", "10,8,0,25,23,3",
                  "--output", str(out)]) == 0  # fmt: skip
    in_use = torch.cat(seen_in_use)
    stored = np.stack([np.asarray(row["image"])[..., 0] for row in datasets.load_from_disk(str(data))["train"]])
    assert (stored[:, :, :6] == 60).all() and (stored[:, 8:24, 10:26] > 230).mean() > 0.95  # -1000 HU -> 60
    assert len(in_use) == 4 and seen_in_training
    for pixels in torch.cat(seen_in_training):
        assert any(torch.allclose(pixels, used, atol=1e-5) for used in in_use), "training pixels never seen in use"
