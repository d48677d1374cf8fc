"""DB-SAM configuration: SAM's configuration plus the dual-branch adapter settings."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import SamConfig

ADAPTER_INITS = ("paper", "identity")
SE_ACTIVATIONS = ("silu", "gelu")

VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # The blocks as the paper's text describes them; where it is silent, this project's choices.
    "paper": {
        "se_activation": "silu",
        "channel_attention_bias": True,
        "se_divisor": 1,
        "conv_branch_channels": [64, 128, 256, 256],
        "conv_branch_kernel_sizes": [3, 3, 1, 1],
        "conv_branch_projection_bias": True,
        "conv_branch_level_embedding": False,
        "conv_branch_batch_norm_momentum": 0.1,
        "adapter_layer_norm_eps": None,  # the ViT's own (1e-6 for SAM)
        "bca_attention_dropout": 0.0,
        "adapter_dropout": 0.4,
        "fusion_ffn_ratio": 0.0,
        "fusion_layer_norm": False,
    },
    # The blocks of the authors' public release (github AlfredQin/DB-SAM, commit 5f0d6e9).
    "authors": {
        "se_activation": "gelu",
        "channel_attention_bias": False,
        "se_divisor": 8,
        "conv_branch_channels": [256, 256, 512, 512],
        "conv_branch_kernel_sizes": [3, 1, 3, 1],
        "conv_branch_projection_bias": False,
        "conv_branch_level_embedding": True,
        "conv_branch_batch_norm_momentum": 0.01,
        "adapter_layer_norm_eps": 1e-5,
        "bca_attention_dropout": 0.1,
        "adapter_dropout": 0.1,
        "fusion_ffn_ratio": 4.0,
        "fusion_layer_norm": True,
    },
}
"""Per `adapter_variant`, the value each variant-dependent field takes when it is left at `None`."""


@strict
class DBSamConfig(SamConfig):
    r"""
    Configuration of a [`DBSamModel`]: a SAM configuration (`vision_config`, `prompt_encoder_config`,
    `mask_decoder_config`, unchanged) plus the adapter choices of DB-SAM (Qin et al., MICCAI 2024).

    Fields left at `None` derive from the ViT backbone, so that any SAM size (ViT-B/L/H or a tiny test
    model) loads without extra arguments: adapters work at the ViT width, the deformable attention uses
    the ViT's head count, stages end at the ViT's global-attention layers and the convolution branch
    reads the image at 4x the ViT grid (256 px for a 1024 px, patch-16 ViT).

    stage_end_indexes (`list[int]`, *optional*):
        ViT layer indexes that end a stage; a bilateral cross-attention block follows each. Defaults to
        `vision_config.global_attn_indexes` (ViT-B: `[2, 5, 8, 11]`).
    channel_attention_indexes (`list[int]`, *optional*):
        ViT layer indexes followed by a channel attention block (Eq. 1). Defaults to `stage_end_indexes`
        (the paper's figure and the authors' code); any list of layers is allowed.
    use_channel_attention (`bool`, defaults to `True`):
        Add the channel attention blocks to the ViT branch (paper Table 3, first column).
    use_conv_branch (`bool`, defaults to `True`):
        Add the convolution branch and the bilateral cross-attention blocks (Table 3, second column).
    use_fusion (`bool`, defaults to `True`):
        Fuse both branches with the ViT-Conv fusion block (Eq. 2) before the neck; when off the neck reads
        the ViT stream only. Requires `use_conv_branch`.
    adapter_variant (`str`, defaults to `"paper"`):
        `"paper"`: the blocks as the paper's text describes them. `"authors"`: the blocks of the authors'
        public release (github AlfredQin/DB-SAM, commit 5f0d6e9), which differ in the details below. The
        variant only fills the fields marked *variant* (values listed as paper / authors) that are left at
        `None`; each can be set on its own.
    se_ratio (`float`, defaults to 0.25):
        Squeeze ratio of the channel attention block's squeeze-and-excitation (768 -> 192 -> 768 at ViT-B).
    se_activation (`str`, *variant*: `"silu"` / `"gelu"`):
        Activation between the squeeze and excite convolutions of the channel attention block.
    channel_attention_bias (`bool`, *variant*: `True` / `False`):
        Whether the channel attention block's four convolutions (depthwise, squeeze, excite, pointwise) have biases.
    se_divisor (`int`, *variant*: 1 / 8):
        The squeeze width `width * se_ratio` is rounded to a multiple of this (timm's `make_divisible`).
    conv_branch_channels (`list[int]`, *variant*: `[64, 128, 256, 256]` / `[256, 256, 512, 512]`):
        Output widths of the convolution branch's first four layers (each followed by BatchNorm + ReLU); a
        last 1x1 convolution projects to the ViT width.
    conv_branch_kernel_sizes (`list[int]`, *variant*: `[3, 3, 1, 1]` / `[3, 1, 3, 1]`):
        Kernel sizes of those four layers: two 3x3 convolutions with stride 2 (4x downsampling in all) and two 1x1.
    conv_branch_projection_bias (`bool`, *variant*: `True` / `False`):
        Whether the convolution branch's last 1x1 convolution has a bias.
    conv_branch_level_embedding (`bool`, *variant*: `False` / `True`):
        Add a learnable per-channel embedding (zero at init) to the convolution branch's output, the authors'
        per-level embedding for their single level.
    conv_branch_batch_norm_momentum (`float`, *variant*: 0.1 / 0.01):
        Momentum of the convolution branch's BatchNorm running statistics.
    conv_input_size (`int`, *optional*):
        Side of the image the convolution branch reads. Must be 4x the ViT grid, since two stride-2
        convolutions bring it to the grid. Defaults to `4 * image_size // patch_size`.
    deformable_num_heads (`int`, *optional*):
        Heads of the deformable cross-attention. Must divide the ViT width. Defaults to the ViT's heads.
    deformable_num_points (`int`, defaults to 4):
        Sampling points per head of the deformable cross-attention.
    bca_ffn_ratio (`float`, defaults to 4.0):
        Hidden width of the cross-attention blocks' feed-forward layers as a multiple of the ViT width.
    fusion_hidden_size (`int`, defaults to 64):
        Squeeze width of the ViT-Conv fusion block's token-wise attention (768 -> 64 -> 768 at ViT-B).
    adapter_layer_norm_eps (`float`, *variant*: the ViT's `layer_norm_eps` / 1e-5):
        Epsilon of the LayerNorms of the cross-attention blocks and of the fusion block.
    bca_attention_dropout (`float`, *variant*: 0.0 / 0.1):
        Dropout on the deformable attention's output in the cross-attention blocks.
    adapter_dropout (`float`, *variant*: 0.4 / 0.1):
        Dropout inside the cross-attention blocks' feed-forward layers (paper: "dropout ... 0.4").
    adapter_drop_path_rate (`float`, defaults to 0.4):
        Stochastic depth on every adapter residual branch (paper: 0.4; the release: 0.4).
    fusion_ffn_ratio (`float`, *variant*: 0 / 4.0):
        When positive, a residual `LayerNorm -> FFN` of this hidden ratio follows the fusion gate.
    fusion_layer_norm (`bool`, *variant*: `False` / `True`):
        A learnable LayerNorm on the fused features before SAM's neck. SAM's neck cannot undo it, so it is
        incompatible with `adapter_init="identity"`.
    adapter_init (`str`, defaults to `"paper"`):
        `"paper"` initialises the adapters as their source papers do (Deformable DETR for the deformable
        attention). `"identity"` zeroes the last projection of every residual branch and of the convolution
        branch and biases the fusion gate towards the ViT, so that a fresh DB-SAM reproduces the SAM
        checkpoint it was built from (within 1e-4): useful to fine-tune from MedSAM. Refused with
        `fusion_layer_norm` (a LayerNorm before the neck cannot start as the identity).
    train_neck (`bool`, defaults to `True`):
        Whether `DBSamModel.freeze_for_training` leaves SAM's neck trainable (the authors train it).
    """

    model_type = "dbsam"

    stage_end_indexes: list[int] | None = None
    channel_attention_indexes: list[int] | None = None
    use_channel_attention: bool = True
    use_conv_branch: bool = True
    use_fusion: bool = True
    adapter_variant: str = "paper"
    se_ratio: float = 0.25
    se_activation: str | None = None
    channel_attention_bias: bool | None = None
    se_divisor: int | None = None
    conv_branch_channels: list[int] | tuple[int, ...] | None = None
    conv_branch_kernel_sizes: list[int] | tuple[int, ...] | None = None
    conv_branch_projection_bias: bool | None = None
    conv_branch_level_embedding: bool | None = None
    conv_branch_batch_norm_momentum: float | None = None
    conv_input_size: int | None = None
    deformable_num_heads: int | None = None
    deformable_num_points: int = 4
    bca_ffn_ratio: float | int = 4.0
    fusion_hidden_size: int = 64
    adapter_layer_norm_eps: float | None = None
    bca_attention_dropout: float | int | None = None
    adapter_dropout: float | int | None = None
    adapter_drop_path_rate: float | int = 0.4
    fusion_ffn_ratio: float | int | None = None
    fusion_layer_norm: bool | None = None
    adapter_init: str = "paper"
    train_neck: bool = True

    def __post_init__(self, **kwargs):
        # A SAM checkpoint's config.json says model_type "sam"; in a DBSamConfig it is always "dbsam".
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        vision = self.vision_config
        grid = vision.image_size // vision.patch_size
        if self.stage_end_indexes is None:
            self.stage_end_indexes = list(vision.global_attn_indexes)
        if self.channel_attention_indexes is None:
            self.channel_attention_indexes = list(self.stage_end_indexes)
        if self.deformable_num_heads is None:
            self.deformable_num_heads = vision.num_attention_heads
        if self.conv_input_size is None:
            self.conv_input_size = 4 * grid
        self.apply_variant_defaults()
        self.stage_end_indexes = sorted(int(i) for i in self.stage_end_indexes)
        self.channel_attention_indexes = sorted(int(i) for i in self.channel_attention_indexes)
        self.conv_branch_channels = [int(c) for c in self.conv_branch_channels]
        self.conv_branch_kernel_sizes = [int(k) for k in self.conv_branch_kernel_sizes]
        self.validate_adapters()

    def apply_variant_defaults(self) -> None:
        """Fill every variant-dependent field left at `None` from `VARIANT_DEFAULTS[adapter_variant]`."""
        if self.adapter_variant not in VARIANT_DEFAULTS:
            raise ValueError(
                f"unknown adapter_variant {self.adapter_variant!r}; expected one of {tuple(VARIANT_DEFAULTS)}"
            )
        for name, value in VARIANT_DEFAULTS[self.adapter_variant].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if self.adapter_layer_norm_eps is None:
            self.adapter_layer_norm_eps = self.vision_config.layer_norm_eps

    def validate_adapters(self) -> None:
        """Raise a ValueError naming the field for any adapter setting the backbone cannot take."""
        vision = self.vision_config
        depth, width, grid = vision.num_hidden_layers, vision.hidden_size, vision.image_size // vision.patch_size
        for name in ("stage_end_indexes", "channel_attention_indexes"):
            indexes = getattr(self, name)
            bad = [i for i in indexes if not 0 <= i < depth]
            if bad:
                raise ValueError(f"{name} {bad} out of range: the ViT has {depth} layers (valid 0..{depth - 1})")
            if len(set(indexes)) != len(indexes):
                raise ValueError(f"{name} has repeated layer indexes: {indexes}")
        if self.use_conv_branch and not self.stage_end_indexes:
            raise ValueError("stage_end_indexes is empty but use_conv_branch needs at least one stage end")
        if self.use_fusion and not self.use_conv_branch:
            raise ValueError("use_fusion=True needs use_conv_branch=True: the fusion block mixes both branches")
        if width % self.deformable_num_heads != 0:
            raise ValueError(f"deformable_num_heads={self.deformable_num_heads} does not divide the ViT width {width}")
        if self.conv_input_size != 4 * grid:
            raise ValueError(
                f"conv_input_size={self.conv_input_size} does not give the ViT grid {grid}x{grid}: the convolution "
                f"branch downsamples 4x, so it must be {4 * grid}"
            )
        if len(self.conv_branch_channels) != 4 or min(self.conv_branch_channels) < 1:
            raise ValueError(
                f"conv_branch_channels must be 4 positive widths (two 3x3 and two 1x1 convs), got {self.conv_branch_channels}"
            )
        if sorted(self.conv_branch_kernel_sizes) != [1, 1, 3, 3]:
            raise ValueError(
                "conv_branch_kernel_sizes must order two 3x3 (stride 2) and two 1x1 convolutions, e.g. [3, 3, 1, 1], "
                f"got {self.conv_branch_kernel_sizes}"
            )
        if self.se_activation not in SE_ACTIVATIONS:
            raise ValueError(f"unknown se_activation {self.se_activation!r}; expected one of {SE_ACTIVATIONS}")
        if self.se_divisor < 1:
            raise ValueError(f"se_divisor must be >= 1, got {self.se_divisor}")
        if not 0.0 <= self.conv_branch_batch_norm_momentum <= 1.0:
            raise ValueError(
                f"conv_branch_batch_norm_momentum must be in [0, 1], got {self.conv_branch_batch_norm_momentum}"
            )
        if self.adapter_layer_norm_eps <= 0:
            raise ValueError(f"adapter_layer_norm_eps must be positive, got {self.adapter_layer_norm_eps}")
        if self.fusion_ffn_ratio < 0:
            raise ValueError(
                f"fusion_ffn_ratio must be >= 0 (0: no feed-forward after the gate), got {self.fusion_ffn_ratio}"
            )
        if self.adapter_init == "identity" and self.use_fusion and self.fusion_layer_norm:
            raise ValueError(
                "adapter_init='identity' cannot reproduce SAM with fusion_layer_norm=True (the authors' variant): a "
                "LayerNorm before SAM's neck removes each token's mean, which the neck does not undo. Set "
                "fusion_layer_norm=False or adapter_init='paper'"
            )
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter_init {self.adapter_init!r}; expected one of {ADAPTER_INITS}")
        for name in ("adapter_dropout", "adapter_drop_path_rate", "bca_attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("se_ratio", "bca_ffn_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.deformable_num_points < 1 or self.fusion_hidden_size < 1:
            raise ValueError("deformable_num_points and fusion_hidden_size must be positive")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> DBSamConfig:
        """Apply adapter keyword arguments before construction, so derived defaults and validation see them.

        This is what makes `DBSamModel.from_pretrained(sam_checkpoint, use_fusion=False)` work.
        """
        config_dict = dict(config_dict)
        config_dict.pop("model_type", None)
        if kwargs.get("adapter_variant", config_dict.get("adapter_variant")) != config_dict.get("adapter_variant"):
            # A saved config holds the old variant's resolved values: let the new variant fill them.
            for name in VARIANT_DEFAULTS["paper"]:
                config_dict.pop(name, None)
        adapter_fields = set(cls.__dataclass_fields__) - set(SamConfig.__dataclass_fields__)
        for name in adapter_fields & set(kwargs):
            config_dict[name] = kwargs.pop(name)
        return super().from_dict(config_dict, **kwargs)


__all__ = ["DBSamConfig"]
