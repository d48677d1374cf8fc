"""Tiny SAM-shaped configurations (about 40k parameters) so that model tests run in milliseconds."""

from __future__ import annotations

import torch
from transformers import SamConfig, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.processing import set_intensity_config

TINY_IMAGE_SIZE = 32
TINY_MASK_SIZE = 64  # low-res mask side: 4x the ViT grid (32 / 2 = 16), as 256 = 4 x 64 at full size


def tiny_sam_config_dict() -> dict:
    """Keyword arguments of a tiny but valid SamConfig: every size as small as SAM's code allows."""
    return {
        "vision_config": {
            "hidden_size": 32,
            "output_channels": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 2,
            "window_size": 4,
            "global_attn_indexes": [1],
            "num_pos_feats": 8,
            "mlp_dim": 64,
        },
        "prompt_encoder_config": {
            "hidden_size": 16,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 2,
            "mask_input_channels": 4,
        },
        "mask_decoder_config": {
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    }


def tiny_sam_config() -> SamConfig:
    return SamConfig(**tiny_sam_config_dict())


def tiny_processor() -> SamProcessor:
    """A SamProcessor whose sizes match the tiny model (image 32, low-res masks 64)."""
    image_processor = SamImageProcessorPil(
        size={"longest_edge": TINY_IMAGE_SIZE},
        pad_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        mask_size={"longest_edge": TINY_MASK_SIZE},
        mask_pad_size={"height": TINY_MASK_SIZE, "width": TINY_MASK_SIZE},
    )
    return SamProcessor(image_processor=image_processor)


def scrambled_tiny_dbsam(seed: int = 0) -> DBSamModel:
    """A tiny DB-SAM with fan-in-scaled random weights: fresh SAM weights give constant masks, useless for parity."""
    return scramble_weights(DBSamModel(DBSamConfig(**tiny_sam_config_dict())).eval(), seed)


def scramble_weights(model: DBSamModel, seed: int = 0) -> DBSamModel:
    """Fan-in-scaled random weights in place (norms keep theirs), so that masks vary with the input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5)
            elif "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def save_tiny_dbsam(folder, modality: str | None = None, window=None) -> str:
    processor = tiny_processor()
    if modality is not None:
        set_intensity_config(processor, modality, window)
    scrambled_tiny_dbsam().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def count_encoder_calls(model, monkeypatch) -> list[int]:
    calls = []
    original = model.get_image_embeddings

    def counted(pixel_values, *args, **kwargs):
        calls.append(len(pixel_values))
        return original(pixel_values, *args, **kwargs)

    monkeypatch.setattr(model, "get_image_embeddings", counted)
    return calls
