"""Tiny SAM-shaped configurations (about 40k parameters) so that model tests run in milliseconds."""

from __future__ import annotations

from transformers import SamConfig, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

TINY_IMAGE_SIZE = 32
TINY_MASK_SIZE = 64  # low-res mask side: 4x the ViT grid (32 / 2 = 16), as 256 = 4 x 64 at full size


def tiny_sam_config_dict() -> dict:
    """Keyword arguments of a tiny but valid SamConfig (DESIGN.md section 3)."""
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
