"""The model and processor of a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from arguments import ModelArguments
from transformers import AutoProcessor, SamProcessor

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.convert import build_sam_processor, pixel_statistics
from modeling_dbsam.data.card import read_preprocessing
from modeling_dbsam.processing import load_processor, set_dataset_preprocessing


def build_model(args: ModelArguments) -> DBSamModel:
    """A DB-SAM from a SAM / MedSAM / DB-SAM checkpoint, or randomly initialised from ``model_config``.

    Adapter fields of ``args`` override the checkpoint's configuration. Seed torch before calling:
    the new adapter weights (and, with ``model_config``, all weights) are drawn at random.
    """
    overrides = args.config_overrides()
    if args.model_config is not None:
        config_dict = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
        model = DBSamModel(DBSamConfig.from_dict(config_dict, **overrides))
        reset_sam_layers(model)
        return model
    return DBSamModel.from_pretrained(args.model, **overrides)


def reset_sam_layers(model: DBSamModel) -> None:
    """Give SAM's layers of a model trained from random weights PyTorch's default initialisation, as Meta's
    segment-anything has them; DB-SAM's adapters keep their own.

    transformers' SAM initialisation (normal, std 0.02; 1e-10 in the ViT) is made to be overwritten by a
    checkpoint: its ViT outputs almost nothing and its mask logits start near 1e-6. From it, the tiny test
    model, all of it trainable, did not learn to fill a box on blank images in 300 steps (DSC 0); from
    PyTorch's it reached DSC 0.59 (docs/training.md, "The quickstart").
    """
    adapters = {id(module) for module in model.adapter_modules()}
    for module in model.modules():
        if id(module) in adapters:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)):
            module.reset_parameters()


def wants_sync_batch_norm(setting: bool | None, num_processes: int, device: torch.device) -> bool:
    """Whether the conv branch's BatchNorm should be synchronised: by default when several GPU processes
    each see a slice of the batch. PyTorch's SyncBatchNorm runs on accelerators only."""
    if setting is None:
        return num_processes > 1 and device.type != "cpu"
    if setting and num_processes > 1 and device.type == "cpu":
        raise ValueError("sync_batch_norm: PyTorch's SyncBatchNorm needs GPU processes; set it false on CPU")
    return setting


def convert_to_sync_batch_norm(model: DBSamModel) -> int:
    """Replace the conv branch's BatchNorm layers by SyncBatchNorm (same statistics, momentum and parameter
    names, so checkpoints and `save_pretrained` are unchanged); return how many were replaced."""
    branch = model.vision_encoder.conv_branch
    if branch is None:
        return 0
    count = sum(isinstance(module, torch.nn.BatchNorm2d) for module in branch.modules())
    model.vision_encoder.conv_branch = torch.nn.SyncBatchNorm.convert_sync_batchnorm(branch)
    return count


def build_processor(args: ModelArguments, config: DBSamConfig, data_dir: str | None = None) -> SamProcessor:
    """The processor named by ``processor``, the checkpoint's own, or SAM's preprocessing sized to ``model_config``,
    with the intensity rule of the training data (``data_dir``'s card), so that inference reproduces it."""
    source = args.processor or args.model
    if source is None:
        processor = build_sam_processor(config, *pixel_statistics({}))
    else:
        processor = load_processor(source) if Path(source).is_dir() else AutoProcessor.from_pretrained(source)
        size, expected = processor.image_processor.size["longest_edge"], config.vision_config.image_size
        if size != expected:
            raise ValueError(
                f"the processor of {source} resizes images to {size} px but the model takes {expected} px"
            )
    preprocessing = read_preprocessing(data_dir) if data_dir is not None else None
    if preprocessing is not None:
        set_dataset_preprocessing(processor, preprocessing)
    return processor
