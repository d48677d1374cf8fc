"""DB-SAM: SAM with a dual-branch image encoder (Qin et al., MICCAI 2024).

Only the image encoder changes. SAM's ViT layers stay (frozen in training) and gain, per stage,
a channel attention block (Eq. 1) and a bilateral deformable cross-attention with a light
convolution branch that reads the image at 256 px; a ViT-Conv fusion (Eq. 2) feeds SAM's neck.
SAM's parameter names are unchanged, so every SAM / MedSAM checkpoint loads into `DBSamModel`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
from transformers.models.sam.modeling_sam import (
    SamImageSegmentationOutput,
    SamLayerNorm,
    SamPositionalEmbedding,
    SamVisionEncoder,
    SamVisionEncoderOutput,
)
from transformers.models.swin.modeling_swin import SwinDropPath
from transformers.processing_utils import Unpack
from transformers.utils.generic import TransformersKwargs, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_dbsam import DBSamConfig


class DBSamDropPath(SwinDropPath):
    """Stochastic depth on an adapter's residual branch (per sample)."""


class DBSamAdapter(nn.Module):
    """Base of every adapter module: knows how to initialise itself for `adapter_init`.

    The vision encoder calls `init_adapter_weights` on each adapter after SAM's own init (which uses
    the vision config's 1e-10 std, far too small for new weights), so adapters own their init.
    """

    def init_adapter_weights(self, adapter_init: str) -> None:
        raise NotImplementedError


def _init_linear(linear: nn.Linear, std: float = 0.02) -> None:
    init.trunc_normal_(linear.weight, std=std)
    if linear.bias is not None:
        init.zeros_(linear.bias)


def _init_conv(conv: nn.Conv2d) -> None:
    """He init over the fan-out of one group, as timm and the authors do: a 3x3 depthwise conv gets std
    sqrt(2 / 9) = 0.47, where PyTorch's `kaiming_normal_` ignores the groups and gives 0.017 at width 768."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    init.normal_(conv.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        init.zeros_(conv.bias)


def make_divisible(value: float, divisor: int) -> int:
    """timm's rounding of a layer width to a multiple of `divisor` (at least `divisor`)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def _zero(module: nn.Module) -> None:
    init.zeros_(module.weight)
    if module.bias is not None:
        init.zeros_(module.bias)


class DBSamChannelAttentionBlock(DBSamAdapter, GradientCheckpointingLayer):
    """Eq. 1, `F + Conv1x1(SE(DWConv3x3(LN(F))))`, on channels-last ViT tokens, with the GELU after the
    depthwise conv that the authors' block has (Eq. 1 omits it)."""

    def __init__(self, config: DBSamConfig):
        super().__init__()
        width, bias = config.vision_config.hidden_size, config.channel_attention_bias
        squeezed = make_divisible(width * config.se_ratio, config.se_divisor)
        self.layer_norm = SamLayerNorm(width, eps=config.vision_config.layer_norm_eps)
        self.depthwise = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width, bias=bias)
        self.activation = nn.GELU()
        self.squeeze = nn.Conv2d(width, squeezed, kernel_size=1, bias=bias)
        self.squeeze_activation = nn.SiLU() if config.se_activation == "silu" else nn.GELU()
        self.excite = nn.Conv2d(squeezed, width, kernel_size=1, bias=bias)
        self.pointwise = nn.Conv2d(width, width, kernel_size=1, bias=bias)
        self.drop_path = DBSamDropPath(config.adapter_drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = self.layer_norm(hidden_states).permute(0, 3, 1, 2)
        features = self.activation(self.depthwise(features))
        gate = self.excite(self.squeeze_activation(self.squeeze(features.mean(dim=(2, 3), keepdim=True))))
        features = self.pointwise(features * torch.sigmoid(gate))
        return hidden_states + self.drop_path(features.permute(0, 2, 3, 1))

    def init_adapter_weights(self, adapter_init: str) -> None:
        for conv in (self.depthwise, self.squeeze, self.excite, self.pointwise):
            _init_conv(conv)
        if adapter_init == "identity":
            _zero(self.pointwise)


class DBSamConvBranch(DBSamAdapter):
    """The light-weight convolution block: two 3x3 stride-2 and three 1x1 convolutions, BN + ReLU after
    the first four; maps the 256 px image to the ViT grid at the ViT width (channels-last).

    `conv_branch_kernel_sizes` orders the first four (paper variant 3-3-1-1, the authors' 3-1-3-1).
    """

    def __init__(self, config: DBSamConfig):
        super().__init__()
        widths = [config.vision_config.num_channels, *config.conv_branch_channels]
        layers: list[nn.Module] = []
        for c_in, c_out, kernel in zip(widths[:-1], widths[1:], config.conv_branch_kernel_sizes):
            layers += [
                nn.Conv2d(c_in, c_out, kernel, stride=2 if kernel == 3 else 1, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(c_out, momentum=config.conv_branch_batch_norm_momentum),
                nn.ReLU(inplace=True),
            ]
        self.layers = nn.Sequential(*layers)
        hidden = config.vision_config.hidden_size
        self.projection = nn.Conv2d(widths[-1], hidden, kernel_size=1, bias=config.conv_branch_projection_bias)
        self.level_embedding = nn.Parameter(torch.zeros(hidden)) if config.conv_branch_level_embedding else None

    def forward(self, conv_pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.projection(self.layers(conv_pixel_values)).permute(0, 2, 3, 1)
        return features if self.level_embedding is None else features + self.level_embedding

    def init_adapter_weights(self, adapter_init: str) -> None:
        for module in self.layers:
            if isinstance(module, nn.Conv2d):
                _init_conv(module)
            elif isinstance(module, nn.BatchNorm2d):
                init.ones_(module.weight)
                init.zeros_(module.bias)
        _init_conv(self.projection)
        if self.level_embedding is not None:
            init.zeros_(self.level_embedding)
        if adapter_init == "identity":
            # The shallow stream starts at zero, so the fusion output is a scaled ViT stream that SAM's
            # neck LayerNorm maps back to SAM's embedding; training grows it from there.
            _zero(self.projection)


class DBSamDeformableAttention(DBSamAdapter):
    """Single-level deformable attention (Deformable DETR) over a `grid x grid` value map.

    Queries sample `num_points` locations per head around their own pixel centre; offsets are in
    value-map pixels. Sampling runs in fp32 even under autocast, because bf16 locations are too
    coarse to address a 64x64 map.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_points = num_heads, num_points
        self.sampling_offsets = nn.Linear(hidden_size, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(hidden_size, num_heads * num_points)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)
        self.sampler = MultiScaleDeformableAttention()

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """`query` and `value` are channels-last maps `(batch, height, width, hidden)` of the same grid."""
        batch, height, width, hidden = query.shape
        num_queries = height * width
        query, value = query.reshape(batch, num_queries, hidden), value.reshape(batch, num_queries, hidden)
        with torch.autocast(query.device.type, enabled=False):
            dtype = self.value_proj.weight.dtype
            sample_dtype = torch.promote_types(dtype, torch.float32)  # fp32 locations, or fp64 for a fp64 model
            query, value = query.to(dtype), value.to(dtype)
            value = self.value_proj(value).view(batch, num_queries, self.num_heads, hidden // self.num_heads)
            offsets = self.sampling_offsets(query).view(batch, num_queries, self.num_heads, 1, self.num_points, 2)
            weights = self.attention_weights(query).view(batch, num_queries, self.num_heads, self.num_points)
            weights = weights.to(sample_dtype).softmax(-1).view(batch, num_queries, self.num_heads, 1, self.num_points)
            reference = self._reference_points(height, width, query.device, sample_dtype)
            normalizer = torch.tensor([width, height], dtype=sample_dtype, device=query.device)
            locations = reference[None, :, None, None, None, :] + offsets.to(sample_dtype) / normalizer
            shapes = torch.tensor([[height, width]], device=query.device)
            output = self.sampler(
                value.to(sample_dtype), shapes, [(height, width)], shapes.new_zeros(1), locations, weights, 64
            )
            output = self.output_proj(output.to(dtype))
        return output.view(batch, height, width, hidden)

    @staticmethod
    def _reference_points(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Normalised (x, y) pixel centres of the query grid, row-major."""
        ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)

    def init_adapter_weights(self, adapter_init: str) -> None:
        # Deformable DETR: zero offset weights, offset biases on a ring of directions, growing per point.
        init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        scales = torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]
        init.copy_(self.sampling_offsets.bias, (directions[:, None, :] * scales).flatten())
        init.zeros_(self.attention_weights.weight)
        init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            init.xavier_uniform_(linear.weight)
            init.zeros_(linear.bias)
        if adapter_init == "identity":
            _zero(self.output_proj)


class DBSamFeedForward(DBSamAdapter):
    """Linear - GELU - Dropout - Linear - Dropout."""

    def __init__(self, hidden_size: int, ratio: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * ratio))
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(int(hidden_size * ratio), hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))

    def init_adapter_weights(self, adapter_init: str) -> None:
        _init_linear(self.fc1)
        _init_linear(self.fc2)
        if adapter_init == "identity":
            _zero(self.fc2)


class DBSamCrossAttentionHalf(nn.Module):
    """One direction of the bilateral cross-attention: `x + DropPath(Dropout(DeformAttn(LN(x), LN(other))))`,
    then `+ DropPath(FFN(LN(.)))`."""

    def __init__(self, config: DBSamConfig):
        super().__init__()
        width, eps = config.vision_config.hidden_size, config.adapter_layer_norm_eps
        self.query_norm = nn.LayerNorm(width, eps=eps)
        self.value_norm = nn.LayerNorm(width, eps=eps)
        self.attention = DBSamDeformableAttention(width, config.deformable_num_heads, config.deformable_num_points)
        self.attention_dropout = nn.Dropout(config.bca_attention_dropout)
        self.ffn_norm = nn.LayerNorm(width, eps=eps)
        self.ffn = DBSamFeedForward(width, config.bca_ffn_ratio, config.adapter_dropout)
        self.drop_path = DBSamDropPath(config.adapter_drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        attended = self.attention(self.query_norm(hidden_states), self.value_norm(other))
        hidden_states = hidden_states + self.drop_path(self.attention_dropout(attended.to(hidden_states.dtype)))
        return hidden_states + self.drop_path(self.ffn(self.ffn_norm(hidden_states)))


class DBSamBilateralCrossAttention(GradientCheckpointingLayer):
    """Fig. 1(c): the ViT stream attends to the conv stream and vice versa, both from the same inputs.

    Without a later reader of the conv stream (the last stage when fusion is off) its update is not
    built: it would cost compute and leave parameters without gradients, which DDP rejects.
    """

    def __init__(self, config: DBSamConfig, update_shallow: bool = True):
        super().__init__()
        self.vit_from_conv = DBSamCrossAttentionHalf(config)
        self.conv_from_vit = DBSamCrossAttentionHalf(config) if update_shallow else None

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_deep = self.vit_from_conv(deep, shallow)
        return new_deep, shallow if self.conv_from_vit is None else self.conv_from_vit(shallow, deep)


class DBSamFusion(DBSamAdapter):
    """Eq. 2: token-wise gate `M = sigmoid(A_d + A_s)`, output `F_d * M + F_s * (1 - M)`.

    The authors' variant adds a residual `LN -> FFN` after the gate (`fusion_ffn_ratio`) and a learnable
    LayerNorm on the output (`fusion_layer_norm`), as their release does before SAM's neck.
    """

    IDENTITY_GATE_BIAS = 4.0  # sigmoid(4) = 0.98: the ViT stream dominates as the shallow stream grows

    def __init__(self, config: DBSamConfig):
        super().__init__()
        width, squeezed = config.vision_config.hidden_size, config.fusion_hidden_size
        eps = config.adapter_layer_norm_eps
        self.deep_gate = nn.Sequential(nn.Linear(width, squeezed), nn.GELU(), nn.Linear(squeezed, width))
        self.shallow_gate = nn.Sequential(nn.Linear(width, squeezed), nn.GELU(), nn.Linear(squeezed, width))
        self.ffn_norm = self.ffn = self.drop_path = self.output_norm = None
        if config.fusion_ffn_ratio > 0:
            self.ffn_norm = nn.LayerNorm(width, eps=eps)
            # The release's timm Mlp there has no dropout.
            self.ffn = DBSamFeedForward(width, config.fusion_ffn_ratio, dropout=0.0)
            self.drop_path = DBSamDropPath(config.adapter_drop_path_rate)
        if config.fusion_layer_norm:
            self.output_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.deep_gate(deep) + self.shallow_gate(shallow))
        fused = deep * mask + shallow * (1 - mask)
        if self.ffn is not None:
            fused = fused + self.drop_path(self.ffn(self.ffn_norm(fused)))
        return fused if self.output_norm is None else self.output_norm(fused)

    def init_adapter_weights(self, adapter_init: str) -> None:
        for gate in (self.deep_gate, self.shallow_gate):
            _init_linear(gate[0])
            _init_linear(gate[2])
        if adapter_init == "identity":
            _zero(self.deep_gate[2])
            _zero(self.shallow_gate[2])
            init.constant_(self.deep_gate[2].bias, self.IDENTITY_GATE_BIAS)


class DBSamVisionEncoder(SamVisionEncoder):
    """SAM's ViT with DB-SAM's adapters; the forward loop is the only SAM code that changes.

    Adapter modules are keyed by the ViT layer they follow (`channel_attention.2`,
    `cross_attention.2`, ...), so their parameter names say where they sit.
    """

    def __init__(self, config: DBSamConfig):
        super().__init__(config.vision_config)
        self.adapter_config = config
        self.channel_attention = nn.ModuleDict()
        if config.use_channel_attention:
            for index in config.channel_attention_indexes:
                self.channel_attention[str(index)] = DBSamChannelAttentionBlock(config)
        self.conv_branch = DBSamConvBranch(config) if config.use_conv_branch else None
        self.cross_attention = nn.ModuleDict()
        if config.use_conv_branch:
            last = config.stage_end_indexes[-1]
            for index in config.stage_end_indexes:
                update_shallow = config.use_fusion or index != last
                self.cross_attention[str(index)] = DBSamBilateralCrossAttention(config, update_shallow)
        self.fusion = DBSamFusion(config) if config.use_fusion else None
        self.post_init()

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # Adapters are containers initialised through `transformers.initialization`, which skips loaded
        # tensors, so they must not be skipped as "custom code without direct parameters".
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DBSamAdapter):
            module.init_adapter_weights(self.adapter_config.adapter_init)
        else:
            super()._init_weights(module)

    def check_pixel_values(self, pixel_values: torch.Tensor, conv_pixel_values: torch.Tensor | None) -> None:
        """Shape errors name the expected and actual shapes before any convolution runs."""
        config = self.config
        size = config.image_size
        expected = f"(batch, {config.num_channels}, {size}, {size})"
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (config.num_channels, size, size):
            raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
        if conv_pixel_values is None:
            return
        if self.conv_branch is None:
            raise ValueError("conv_pixel_values was given but this model has no convolution branch")
        conv_size = self.adapter_config.conv_input_size
        conv_expected = (pixel_values.shape[0], config.num_channels, conv_size, conv_size)
        if tuple(conv_pixel_values.shape) != conv_expected:
            raise ValueError(
                f"conv_pixel_values must have shape {conv_expected}, got {tuple(conv_pixel_values.shape)}"
            )

    def conv_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Fallback `I_conv` when a caller passes none: `pixel_values` resized to `conv_input_size`, bilinear with
        antialiasing.

        This is a low-passed copy of the image, not the paper's `I_conv`: a 256 px slice reaches the
        ViT upsampled to 1024 px and comes back to 256 px, losing the local detail the branch exists
        to bring back. Callers pass `conv_pixel_values` from
        `modeling_dbsam.pixels.SamPixels(processor)(images, conv_size=...)`, as the predictor and the
        training transform do.
        """
        size = self.adapter_config.conv_input_size
        dtype = torch.promote_types(pixel_values.dtype, torch.float32)  # antialiasing has no bf16 CPU kernel
        resized = F.interpolate(pixel_values.to(dtype), size=(size, size), mode="bilinear", antialias=True)
        return resized.to(pixel_values.dtype)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        conv_pixel_values: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SamVisionEncoderOutput:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        self.check_pixel_values(pixel_values, conv_pixel_values)
        deep = self.patch_embed(pixel_values)
        if self.pos_embed is not None:
            deep = deep + self.pos_embed
        shallow = None
        if self.conv_branch is not None:
            conv_pixel_values = self.conv_input(pixel_values) if conv_pixel_values is None else conv_pixel_values
            shallow = self.conv_branch(conv_pixel_values.to(deep.dtype))
        for index, layer in enumerate(self.layers):
            deep = layer(deep)
            key = str(index)
            if key in self.channel_attention:
                deep = self.channel_attention[key](deep)
            if key in self.cross_attention:
                deep, shallow = self.cross_attention[key](deep, shallow)
        if self.fusion is not None:
            deep = self.fusion(deep, shallow)
        return SamVisionEncoderOutput(last_hidden_state=self.neck(deep))


class DBSamModel(SamModel):
    """SAM with DB-SAM's dual-branch image encoder; prompt encoder and mask decoder unchanged.

    Example:

    ```python
    >>> import modeling_dbsam
    >>> from modeling_dbsam import DBSamConfig, DBSamModel
    >>> model = DBSamModel(DBSamConfig())  # ViT-B sized, random weights
    >>> trainable = model.freeze_for_training()
    ```
    """

    config_class = DBSamConfig
    config: DBSamConfig

    def __init__(self, config: DBSamConfig):
        super().__init__(config)
        self.vision_encoder = DBSamVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SamPositionalEmbedding):
            # Meta's PositionEmbeddingRandom draws its frequencies from N(0, 1); transformers' SAM uses std
            # hidden_size // 2 (384 at ViT-B), which makes the codes of nearby box corners unrelated, so a model
            # trained from random weights memorises positions instead of following boxes. Checkpoints
            # overwrite this (SAM's trained matrix has std 1).
            init.normal_(module.positional_embedding, std=1.0)

    def adapter_modules(self) -> list[nn.Module]:
        """The modules DB-SAM adds to SAM (all inside the vision encoder), with everything inside them."""
        encoder = self.vision_encoder
        containers = [encoder.channel_attention, encoder.conv_branch, encoder.cross_attention, encoder.fusion]
        return [module for container in containers if container is not None for module in container.modules()]

    def adapter_parameter_names(self) -> list[str]:
        """Names of the parameters DB-SAM adds to SAM."""
        adapter_parameters = {id(p) for module in self.adapter_modules() for p in module.parameters(recurse=False)}
        return [name for name, parameter in self.named_parameters() if id(parameter) in adapter_parameters]

    def trainable_parameter_names(self) -> list[str]:
        """The trainable set: adapters and the mask decoder (paper 3.1) and, if `train_neck`, SAM's neck (the
        authors' release).

        This project's decision, not the paper's: two parts of the decoder stay frozen because the paper's loss (BCE + Dice on one mask per box) never
        reaches them: the IoU head, and the hypernetwork heads of SAM's three multimask outputs. Trainable,
        they would get zero gradients and only weight decay would move them, eroding SAM's multimask and
        IoU predictions; and a trainable parameter without a gradient would force DDP's
        `find_unused_parameters`.
        """
        prefixes = ["mask_decoder."] + (["vision_encoder.neck."] if self.config.train_neck else [])
        never_reached = ("mask_decoder.iou_prediction_head.", *self._multimask_head_prefixes())
        names = set(self.adapter_parameter_names())
        for name, _ in self.named_parameters():
            if name.startswith(tuple(prefixes)) and not name.startswith(never_reached):
                names.add(name)
        return sorted(names)

    def _multimask_head_prefixes(self) -> list[str]:
        heads = len(self.mask_decoder.output_hypernetworks_mlps)
        return [f"mask_decoder.output_hypernetworks_mlps.{index}." for index in range(1, heads)]

    def freeze_for_training(self) -> int:
        """Freeze the ViT, patch/position embeddings and the prompt encoder; return the trainable parameter count.

        Every parameter left trainable receives a gradient from a box-prompted forward pass, so DDP needs no
        `find_unused_parameters`.
        """
        trainable = set(self.trainable_parameter_names())
        count = 0
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name in trainable)
            count += parameter.numel() if name in trainable else 0
        return count

    @torch.no_grad()
    def get_image_embeddings(
        self, pixel_values: torch.Tensor, conv_pixel_values: torch.Tensor | None = None, **kwargs
    ):
        """Image embeddings from the dual-branch encoder (`conv_pixel_values` optional, derived otherwise)."""
        return self.vision_encoder(pixel_values, conv_pixel_values=conv_pixel_values, **kwargs)[0]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.LongTensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.LongTensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
        conv_pixel_values: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SamImageSegmentationOutput:
        """SamModel's forward, same positional order; `conv_pixel_values` (new, last) optionally gives the
        convolution branch its own 256 px input."""
        if input_boxes is not None:
            if input_boxes.ndim != 3 or input_boxes.shape[-1] != 4:
                raise ValueError(
                    f"input_boxes must have shape (batch, boxes_per_image, 4), got {tuple(input_boxes.shape)}"
                )
            # SamProcessor returns float64 boxes; the prompt encoder computes in the model's dtype.
            input_boxes = input_boxes.to(self.shared_image_embedding.positional_embedding.dtype)
        if conv_pixel_values is not None:  # the encoder checks both shapes
            if pixel_values is None:
                raise ValueError("conv_pixel_values needs pixel_values")
            image_embeddings = self.vision_encoder(pixel_values, conv_pixel_values=conv_pixel_values)[0]
            pixel_values = None
        return super().forward(
            pixel_values=pixel_values,
            input_points=input_points,
            input_labels=input_labels,
            input_boxes=input_boxes,
            input_masks=input_masks,
            image_embeddings=image_embeddings,
            multimask_output=multimask_output,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            **kwargs,
        )


def reset_to_pytorch_init(model: nn.Module, keep: Iterable[nn.Module] = ()) -> None:
    """PyTorch's default initialisation for every linear, convolution and embedding layer of ``model`` but those in
    ``keep``: Meta's segment-anything has it, and a SAM trained from random weights needs it.

    transformers' SAM initialisation (normal, std 0.02; 1e-10 in the ViT) is made to be overwritten by a
    checkpoint: its ViT outputs almost nothing and its mask logits start near 1e-6. From it, the tiny test
    model, all of it trainable, did not learn to fill a box on blank images in 300 steps (DSC 0); from
    PyTorch's it reached DSC 0.59 (docs/benchmarks.md, "Initialisation").
    """
    kept = {id(module) for module in keep}
    for module in model.modules():
        if id(module) not in kept and isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            module.reset_parameters()


__all__ = ["DBSamModel", "DBSamVisionEncoder", "reset_to_pytorch_init"]
