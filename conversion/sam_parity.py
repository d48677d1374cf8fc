"""Parity of a converted checkpoint with its source model, run inside the converter.

Both models see the same seeded synthetic image (already normalised) with one box and one point prompt.
Each SAM stage is compared: the image embeddings, the prompt embeddings (sparse, dense and the dense
positional encoding), and the low-res mask logits and IoU predictions of all mask tokens (single-mask
and multimask outputs). The decoders of both models run on the reference's prompt embeddings, so each
number measures one stage. For Meta-format checkpoints the reference is Meta's own ``segment_anything``
code, built at the inferred sizes; for transformers checkpoints it is ``transformers.SamModel``.

The image encoders and mask decoders run in float64. The check is about the conversion (names, shapes,
configuration), and in float32 two correct implementations of a deep ViT already differ by more than
the tolerance: summation orders differ and the differences grow through the layers (about 2e-3 in the
mask logits of a randomly initialised ViT-B). Meta's prompt encoder computes in float32 whatever the
weights' dtype, which is why the decoders share the reference's prompt embeddings.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import SamConfig, SamModel

PARITY_TOLERANCE = 1e-4
PARITY_DTYPE = torch.float64
_STANDALONE_MODULE = "segment_anything_modeling"


@dataclass
class ParityInputs:
    """One image with one prompt made of a box and a point, in the model's input frame."""

    pixel_values: torch.Tensor  # (1, C, S, S), already normalised
    box: torch.Tensor  # (1, 4) x0, y0, x1, y1
    point: torch.Tensor  # (1, 1, 2) x, y
    label: torch.Tensor  # (1, 1)


@dataclass
class PromptEmbeddings:
    sparse: torch.Tensor  # (1, num_tokens, C)
    dense: torch.Tensor  # (1, C, grid, grid)
    positional: torch.Tensor  # (1, C, grid, grid)

    def to(self, dtype: torch.dtype) -> PromptEmbeddings:
        return PromptEmbeddings(self.sparse.to(dtype), self.dense.to(dtype), self.positional.to(dtype))


@dataclass
class SamStages:
    """What each stage produced; mask logits and IoU cover the single-mask token then the multimask tokens."""

    image_embeddings: torch.Tensor  # (1, C, grid, grid)
    prompts: PromptEmbeddings
    mask_logits: torch.Tensor  # (1, 1 + num_multimask_outputs, 4 * grid, 4 * grid)
    iou_scores: torch.Tensor  # (1, 1 + num_multimask_outputs)


@dataclass
class ParityResult:
    """Largest absolute difference per stage."""

    image_embeddings: float
    prompt_embeddings: float
    mask_logits: float
    iou_scores: float

    @property
    def passed(self) -> bool:
        # NaN fails: every comparison with NaN is False.
        return all(value <= PARITY_TOLERANCE for value in vars(self).values())

    def describe(self, reference: str) -> str:
        verdict = "ok" if self.passed else f"ABOVE tolerance {PARITY_TOLERANCE:g}"
        differences = ", ".join(f"{name.replace('_', ' ')} {value:.3g}" for name, value in vars(self).items())
        return f"against {reference}, max abs diff: {differences}: {verdict}"


def parity_inputs(config: SamConfig, seed: int = 0) -> ParityInputs:
    """A fixed synthetic image and prompt at the model's input size."""
    vision = config.vision_config
    size = vision.image_size
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(1, vision.num_channels, size, size, generator=generator)
    box = torch.tensor([[0.2, 0.25, 0.7, 0.8]]) * size
    point = torch.tensor([[[0.45, 0.5]]]) * size
    return ParityInputs(pixel_values, box, point, torch.ones(1, 1, dtype=torch.long))


def _max_abs_diff(reference: torch.Tensor, converted: torch.Tensor, name: str) -> float:
    if reference.shape != converted.shape:
        raise ValueError(
            f"{name} shapes differ: reference {tuple(reference.shape)}, converted {tuple(converted.shape)}"
        )
    return (reference.double() - converted.double()).abs().max().item()


def compare(reference: SamStages, converted: SamStages) -> ParityResult:
    prompts = max(
        _max_abs_diff(getattr(reference.prompts, field.name), getattr(converted.prompts, field.name), field.name)
        for field in fields(PromptEmbeddings)
    )
    return ParityResult(
        image_embeddings=_max_abs_diff(reference.image_embeddings, converted.image_embeddings, "image embeddings"),
        prompt_embeddings=prompts,
        mask_logits=_max_abs_diff(reference.mask_logits, converted.mask_logits, "mask logits"),
        iou_scores=_max_abs_diff(reference.iou_scores, converted.iou_scores, "IoU scores"),
    )


@torch.no_grad()
def transformers_stages(
    model: SamModel, inputs: ParityInputs, decode_prompts: PromptEmbeddings | None = None
) -> SamStages:
    """Stages of a transformers SamModel (or DBSamModel) in its own dtype.

    The decoder runs on ``decode_prompts`` (the reference's) when given, else on the model's own.
    """
    dtype = model.dtype
    embeddings = model.get_image_embeddings(inputs.pixel_values.to(dtype))
    sparse, dense = model.get_prompt_embeddings(
        input_points=inputs.point[None].to(dtype),
        input_labels=inputs.label[None],
        input_boxes=inputs.box[None].to(dtype),
    )
    prompts = PromptEmbeddings(sparse[:, 0], dense, model.get_image_wide_positional_embeddings())
    decode = (decode_prompts or prompts).to(dtype)
    masks, scores = [], []
    for multimask_output in (False, True):
        mask_logits, iou = model.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=decode.positional,
            sparse_prompt_embeddings=decode.sparse[:, None],
            dense_prompt_embeddings=decode.dense,
            multimask_output=multimask_output,
        )
        masks.append(mask_logits[:, 0])
        scores.append(iou[:, 0])
    return SamStages(embeddings, prompts, torch.cat(masks, dim=1), torch.cat(scores, dim=1))


def import_meta_modeling():
    """Meta's ``segment_anything.modeling`` package.

    ``segment_anything/__init__.py`` imports its predictor, which needs torchvision; the model code
    does not, so without torchvision the ``modeling`` subpackage is loaded on its own.
    """
    try:
        return importlib.import_module("segment_anything.modeling")
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise ValueError(
                "the parity check of Meta-format checkpoints runs Meta's own SAM code: "
                "pip install segment-anything (or the project's 'convert' extra)"
            ) from error
    if _STANDALONE_MODULE in sys.modules:
        return sys.modules[_STANDALONE_MODULE]
    package = importlib.util.find_spec("segment_anything")
    folder = Path(package.submodule_search_locations[0]) / "modeling"
    spec = importlib.util.spec_from_file_location(
        _STANDALONE_MODULE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_STANDALONE_MODULE] = module
    spec.loader.exec_module(module)
    return module


def build_meta_sam(config: SamConfig) -> nn.ModuleDict:
    """Meta's image encoder, prompt encoder and mask decoder at ``config``'s sizes, under Meta's names.

    Built on the meta device: load weights with ``load_state_dict(..., assign=True)`` so that the
    reference shares the checkpoint's tensors instead of holding a second copy.
    """
    modeling = import_meta_modeling()
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    grid = vision.image_size // vision.patch_size
    with torch.device("meta"):
        image_encoder = modeling.ImageEncoderViT(
            img_size=vision.image_size,
            patch_size=vision.patch_size,
            in_chans=vision.num_channels,
            embed_dim=vision.hidden_size,
            depth=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            # Meta computes int(dim * mlp_ratio); the half keeps float rounding from losing a unit.
            mlp_ratio=(vision.mlp_dim + 0.5) / vision.hidden_size,
            out_chans=vision.output_channels,
            qkv_bias=vision.qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=vision.layer_norm_eps),
            use_abs_pos=vision.use_abs_pos,
            use_rel_pos=vision.use_rel_pos,
            window_size=vision.window_size,
            global_attn_indexes=tuple(vision.global_attn_indexes),
        )
        prompt_encoder = modeling.PromptEncoder(
            embed_dim=prompt.hidden_size,
            image_embedding_size=(grid, grid),
            input_image_size=(vision.image_size, vision.image_size),
            mask_in_chans=prompt.mask_input_channels,
        )
        mask_decoder = modeling.MaskDecoder(
            transformer_dim=decoder.hidden_size,
            transformer=modeling.TwoWayTransformer(
                depth=decoder.num_hidden_layers,
                embedding_dim=decoder.hidden_size,
                num_heads=decoder.num_attention_heads,
                mlp_dim=decoder.mlp_dim,
                attention_downsample_rate=decoder.attention_downsample_rate,
            ),
            num_multimask_outputs=decoder.num_multimask_outputs,
            iou_head_depth=decoder.iou_head_depth,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        )
    return nn.ModuleDict(
        {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
    ).eval()


@contextmanager
def widened_weights(model: nn.Module, dtype: torch.dtype):
    """Run ``model`` at ``dtype`` without a second copy of its weights.

    Each module's own parameters are widened just before its forward and put back right after it, so
    only one module's widened parameters exist at a time. Widening float32 to float64 is exact: this
    computes what a float64 copy of the model would.
    """

    def widen(module: nn.Module, args) -> None:
        module._narrow_parameters = dict(module._parameters)
        for name, parameter in module._narrow_parameters.items():
            if parameter is not None:
                module._parameters[name] = parameter.to(dtype)

    def restore(module: nn.Module, args, output) -> None:
        module._parameters.update(module.__dict__.pop("_narrow_parameters"))

    owners = [module for module in model.modules() if any(True for _ in module.parameters(recurse=False))]
    handles = [hook for m in owners for hook in (m.register_forward_pre_hook(widen), m.register_forward_hook(restore))]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def meta_stages(state_dict: dict[str, torch.Tensor], config: SamConfig, inputs: ParityInputs) -> SamStages:
    """Stages of Meta's reference implementation holding the original checkpoint's tensors themselves.

    The image encoder and mask decoder compute in float64 on the fly (:func:`widened_weights`). The
    prompt encoder stays in float32, as Meta computes its positional encodings whatever the weights'
    dtype; its outputs are widened for the decoder.
    """
    sam = build_meta_sam(config)
    sam.load_state_dict({key: state_dict[key] for key in sam.state_dict()}, strict=True, assign=True)
    sparse, dense = sam.prompt_encoder(points=(inputs.point, inputs.label), boxes=inputs.box, masks=None)
    prompts = PromptEmbeddings(sparse, dense, sam.prompt_encoder.get_dense_pe()).to(PARITY_DTYPE)
    with widened_weights(sam.image_encoder, PARITY_DTYPE) as image_encoder:
        embeddings = image_encoder(inputs.pixel_values.to(PARITY_DTYPE))
    masks, scores = [], []
    with widened_weights(sam.mask_decoder, PARITY_DTYPE) as mask_decoder:
        for multimask_output in (False, True):
            mask_logits, iou = mask_decoder(
                image_embeddings=embeddings,
                image_pe=prompts.positional,
                sparse_prompt_embeddings=prompts.sparse,
                dense_prompt_embeddings=prompts.dense,
                multimask_output=multimask_output,
            )
            masks.append(mask_logits)
            scores.append(iou)
    return SamStages(embeddings, prompts, torch.cat(masks, dim=1), torch.cat(scores, dim=1))
