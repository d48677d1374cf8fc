"""Read Meta's original SAM checkpoints (and MedSAM's, the same layout) as transformers SAM weights.

Meta's ``.pth`` files are bare state dicts with names like ``image_encoder.blocks.0.attn.qkv.weight``;
transformers names the same tensors ``vision_encoder.layers.0.attn.qkv.weight``. This module

- loads such a file safely (``torch.load(weights_only=True)``; files that need pickled code are refused),
- infers the architecture from the tensors themselves, so ViT-B/L/H, MedSAM and non-standard sizes all
  load without a model-name switch,
- renames the tensors without copying them, and lists every unknown, missing or misshapen key.

The renaming runs from transformers names to Meta names, because that direction is a function of the
name alone once the IoU head's depth is known; the checkpoint is then checked against the full set of
names the inferred model expects.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import SamConfig, SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

# Meta's `Sam` keeps these as non-persistent buffers; some forks save them anyway.
PIXEL_STATISTICS_KEYS = ("pixel_mean", "pixel_std")
# SAM's ImageNet statistics on the 0-255 scale, as in Meta's `Sam.__init__`.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# Not stored in the weights: every SAM and MedSAM release uses 8 heads in the mask decoder.
SAM_DECODER_NUM_HEADS = 8
# Not stored in the weights either: Meta's image encoder LayerNorms use eps 1e-6, the mask decoder's
# two-way transformer keeps PyTorch's default 1e-5 (transformers' SamMaskDecoderConfig defaults to 1e-6).
SAM_ENCODER_LAYER_NORM_EPS = 1e-6
SAM_DECODER_LAYER_NORM_EPS = 1e-5
# Wrappers seen around SAM state dicts: MedSAM's training checkpoints, Lightning, DataParallel.
_WRAPPER_KEYS = ("model", "state_dict")
_DATA_PARALLEL_PREFIX = "module."

# transformers name -> Meta name, applied in order to every name the transformers model expects.
_HF_TO_META_RULES: tuple[tuple[str, str], ...] = (
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (
        r"^prompt_encoder\.shared_embedding\.positional_embedding$",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)
# transformers' MLP is proj_in, layers.0..n-3, proj_out; Meta's is layers.0..n-1.
_FEED_FORWARD = re.compile(
    r"^mask_decoder\.(?P<mlp>output_hypernetworks_mlps\.\d+|iou_prediction_head)\.(?P<layer>proj_in|proj_out|layers\.\d+)\."
)
_HYPERNETWORK_MLP_DEPTH = 3  # fixed in both implementations


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a Meta-format SAM or MedSAM checkpoint (``.pth``/``.pt`` or ``.safetensors``).

    Loads with ``weights_only=True`` and memory-maps where the file format allows, so the tensors are
    read from disk as they are used rather than copied up front. Unwraps ``{"model": ...}`` and
    ``{"state_dict": ...}`` and strips DataParallel's ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        loaded = _torch_load(path)
    except pickle.UnpicklingError as error:
        offending = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if offending is None:  # not a pickle of tensors at all: garbage, truncated, or another format
            detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({detail})") from error
        raise ValueError(
            f"{path}: refused to load: the file holds pickled Python objects ({offending.group(1)}), not only "
            f"tensors, and unpickling them would run code from the file. Re-save just the weights from a trusted "
            f"environment, e.g. torch.save(model.state_dict(), 'weights.pth'), and convert that."
        ) from error
    except (RuntimeError, KeyError, EOFError) as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    return _unwrap_state_dict(loaded, path)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # Files saved with torch < 1.6 predate the zip format that memory-mapping needs.
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(loaded, Mapping) and key in loaded and isinstance(loaded[key], Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(loaded).__name__}")
    non_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {', '.join(map(str, non_tensors[:10]))}")
    if all(key.startswith(_DATA_PARALLEL_PREFIX) for key in loaded):
        loaded = {key[len(_DATA_PARALLEL_PREFIX) :]: value for key, value in loaded.items()}
    return dict(loaded)


def _indexes(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct ``N`` of the keys ``prefix.N.*``."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(match.group(1)) for key in state_dict if (match := pattern.match(key))})


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of layers ``prefix.0 .. prefix.N-1``; a gap means a corrupt or truncated checkpoint."""
    indexes = _indexes(state_dict, prefix)
    if indexes != list(range(len(indexes))):
        raise ValueError(f"layers under {prefix} are not numbered 0..N-1: found {indexes}")
    return len(indexes)


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"not a SAM checkpoint in Meta's layout: it has no {key!r}")
    return state_dict[key]


def _infer_vision_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    patch_weight = _require(state_dict, "image_encoder.patch_embed.proj.weight")
    hidden_size, num_channels, patch_size, _ = patch_weight.shape
    grid = _require(state_dict, "image_encoder.pos_embed").shape[1]
    depth = _count_layers(state_dict, "image_encoder.blocks")
    if depth == 0:
        raise ValueError("not a SAM checkpoint in Meta's layout: it has no image_encoder.blocks")
    table_rows = {i: _require(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h").shape for i in range(depth)}
    head_dim = table_rows[0][1]
    if hidden_size % head_dim:
        raise ValueError(f"relative-position tables of width {head_dim} do not divide the ViT width {hidden_size}")
    # A global layer's table spans the whole grid (2 * grid - 1 rows), a window layer's one window.
    global_rows = 2 * grid - 1
    global_attn_indexes = [i for i, (rows, _) in table_rows.items() if rows == global_rows]
    window_rows = {rows for i, (rows, _) in table_rows.items() if i not in global_attn_indexes}
    if len(window_rows) > 1:
        raise ValueError(f"window-attention layers disagree on the window size: table rows {sorted(window_rows)}")
    window_size = (window_rows.pop() + 1) // 2 if window_rows else 0
    return {
        "hidden_size": hidden_size,
        "output_channels": _require(state_dict, "image_encoder.neck.0.weight").shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": hidden_size // head_dim,
        "num_channels": num_channels,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "layer_norm_eps": SAM_ENCODER_LAYER_NORM_EPS,
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state_dict,
        "use_abs_pos": True,
        "use_rel_pos": True,
        "window_size": window_size,
        "global_attn_indexes": global_attn_indexes,
        "num_pos_feats": _require(state_dict, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix").shape[1],
        "mlp_dim": _require(state_dict, "image_encoder.blocks.0.mlp.lin1.weight").shape[0],
    }


def _infer_mask_decoder_config(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int) -> dict:
    mask_tokens = _require(state_dict, "mask_decoder.mask_tokens.weight")
    hidden_size = mask_tokens.shape[1]
    attention_width = _require(state_dict, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight").shape[0]
    for width, what in ((hidden_size, "decoder width"), (attention_width, "cross-attention width")):
        if width % num_attention_heads:
            raise ValueError(f"decoder_num_heads={num_attention_heads} does not divide the {what} {width}")
    return {
        "hidden_size": hidden_size,
        "mlp_dim": _require(state_dict, "mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        "num_hidden_layers": _count_layers(state_dict, "mask_decoder.transformer.layers"),
        "num_attention_heads": num_attention_heads,
        "attention_downsample_rate": hidden_size // attention_width,
        "num_multimask_outputs": mask_tokens.shape[0] - 1,
        "iou_head_depth": _count_layers(state_dict, "mask_decoder.iou_prediction_head.layers"),
        "iou_head_hidden_dim": _require(state_dict, "mask_decoder.iou_prediction_head.layers.0.weight").shape[0],
        "layer_norm_eps": SAM_DECODER_LAYER_NORM_EPS,
    }


def infer_sam_config(
    state_dict: Mapping[str, torch.Tensor], decoder_num_heads: int = SAM_DECODER_NUM_HEADS
) -> SamConfig:
    """The SamConfig of a Meta-format checkpoint, read from its tensor shapes.

    Width, patch size and image size come from the patch embedding and ``pos_embed``; depth from the
    block count; the head count from the relative-position tables (their width is the head dimension);
    global-attention layers are those whose table spans the whole grid (``2 * grid - 1`` rows), the
    window size comes from the others. A model whose window equals its grid cannot be told from a global
    one by its tables; both compute the same attention. The decoder's head count is not stored in any
    tensor shape, hence ``decoder_num_heads``.
    """
    vision = _infer_vision_config(state_dict)
    prompt_hidden = _require(state_dict, "prompt_encoder.not_a_point_embed.weight").shape[1]
    prompt = {
        "hidden_size": prompt_hidden,
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "mask_input_channels": _require(state_dict, "prompt_encoder.mask_downscaling.3.weight").shape[0],
        "num_point_embeddings": _count_layers(state_dict, "prompt_encoder.point_embeddings"),
    }
    decoder = _infer_mask_decoder_config(state_dict, decoder_num_heads)
    widths = {
        "image encoder output": vision["output_channels"],
        "prompt encoder": prompt_hidden,
        "mask decoder": decoder["hidden_size"],
        "2 x positional features": 2 * vision["num_pos_feats"],
    }
    if len(set(widths.values())) != 1:
        raise ValueError(f"inconsistent SAM widths, these must be equal: {widths}")
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def original_key(hf_key: str, iou_head_depth: int) -> str:
    """The name in Meta's layout of the tensor transformers calls ``hf_key``."""
    key = hf_key
    for pattern, replacement in _HF_TO_META_RULES:
        key = re.sub(pattern, replacement, key)
    match = _FEED_FORWARD.match(key)
    if match:
        depth = iou_head_depth if match["mlp"] == "iou_prediction_head" else _HYPERNETWORK_MLP_DEPTH
        layer = match["layer"]
        index = 0 if layer == "proj_in" else depth - 1 if layer == "proj_out" else int(layer.split(".")[1]) + 1
        key = f"mask_decoder.{match['mlp']}.layers.{index}.{key[match.end() :]}"
    return key


def expected_shapes(config: SamConfig) -> dict[str, torch.Size]:
    """Names and shapes of the weights of a SamModel with ``config``, built without allocating memory."""
    with torch.device("meta"):
        model = SamModel(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], config: SamConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under transformers' SAM names; the tensors themselves are not copied.

    Raises a ValueError listing every checkpoint key the model has no place for, every weight the model
    needs that the checkpoint lacks, and every shape that differs.
    """
    iou_head_depth = config.mask_decoder_config.iou_head_depth
    shapes = expected_shapes(config)
    sources = {hf_key: original_key(hf_key, iou_head_depth) for hf_key in shapes}
    used = set(sources.values())
    unknown = sorted(key for key in state_dict if key not in used and key not in PIXEL_STATISTICS_KEYS)
    missing = sorted({meta for meta in sources.values() if meta not in state_dict})
    misshapen = sorted(
        f"{meta}: checkpoint {tuple(state_dict[meta].shape)}, model {tuple(shapes[hf])}"
        for hf, meta in sources.items()
        if meta in state_dict and state_dict[meta].shape != shapes[hf]
    )
    problems = [
        f"{title} ({len(keys)}):\n  " + "\n  ".join(keys)
        for title, keys in (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", misshapen))
        if keys
    ]
    if problems:
        raise ValueError("checkpoint does not match the SAM architecture inferred from it:\n" + "\n".join(problems))
    return {hf_key: state_dict[meta] for hf_key, meta in sources.items()}


def pixel_statistics(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[float], list[float]]:
    """Normalisation mean and std on the 0-1 scale: the checkpoint's own if it saved them, else SAM's."""
    mean, std = (
        state_dict[key].flatten().tolist() if key in state_dict else list(default)
        for key, default in zip(PIXEL_STATISTICS_KEYS, (SAM_PIXEL_MEAN, SAM_PIXEL_STD))
    )
    return [value / 255 for value in mean], [value / 255 for value in std]


def build_sam_processor(config: SamConfig, image_mean: list[float], image_std: list[float]) -> SamProcessor:
    """SAM's preprocessing sized to ``config``: longest edge resized to the image size, padded square,
    normalised with ``image_mean``/``image_std``; low-res masks at 4x the ViT grid."""
    vision = config.vision_config
    image_size = vision.image_size
    mask_size = 4 * (image_size // vision.patch_size)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
        image_mean=image_mean,
        image_std=image_std,
    )
    return SamProcessor(image_processor=image_processor)
