"""DBSamConfig / DBSamModel: parity with SAM, init, training hygiene, persistence, bad input."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from tiny import scrambled_tiny_dbsam, tiny_sam_config, tiny_sam_config_dict
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskGeneration,
    SamModel,
    SamVisionConfig,
)
from transformers.models.sam.modeling_sam import SamImageSegmentationOutput

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.modeling_dbsam import DBSamChannelAttentionBlock, DBSamDeformableAttention

ALL_OFF = {"use_channel_attention": False, "use_conv_branch": False, "use_fusion": False}
TABLE3_ROWS = [
    ALL_OFF,
    {"use_channel_attention": True, "use_conv_branch": False, "use_fusion": False},
    {"use_channel_attention": True, "use_conv_branch": True, "use_fusion": False},
    {"use_channel_attention": True, "use_conv_branch": True, "use_fusion": True},
]
NO_DROP = {"adapter_dropout": 0.0, "adapter_drop_path_rate": 0.0}
VARIANTS = ("paper", "authors")


def tiny_dbsam(**kwargs) -> DBSamModel:
    return DBSamModel(DBSamConfig(**tiny_sam_config_dict(), **kwargs))


def inputs(batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 25.0]], [[5.0, 5.0, 30.0, 30.0]]])[:batch]
    return {"pixel_values": pixel_values, "input_boxes": boxes, "multimask_output": False}


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    """A tiny SAM with weights large enough that its masks are far from zero."""
    torch.manual_seed(0)
    sam = SamModel(tiny_sam_config())
    with torch.no_grad():
        for parameter in sam.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    folder = tmp_path_factory.mktemp("sam")
    sam.save_pretrained(folder)
    return folder, sam.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_switches_off_equals_sam_bitwise(sam_checkpoint, variant):
    folder, sam = sam_checkpoint
    model = DBSamModel.from_pretrained(folder, adapter_variant=variant, **ALL_OFF).eval()
    assert model.config.adapter_variant == variant
    assert model.adapter_parameter_names() == []
    with torch.no_grad():
        expected, actual = sam(**inputs()), model(**inputs())
    assert expected.pred_masks.abs().max() > 0.1
    assert torch.equal(expected.pred_masks, actual.pred_masks)
    assert torch.equal(expected.iou_scores, actual.iou_scores)


@pytest.mark.parametrize(
    ("variant", "overrides"), [("paper", {}), ("authors", {"fusion_layer_norm": False})], ids=["paper", "authors"]
)
def test_identity_init_reproduces_sam(sam_checkpoint, variant, overrides):
    folder, sam = sam_checkpoint
    model, info = DBSamModel.from_pretrained(
        folder, adapter_variant=variant, adapter_init="identity", output_loading_info=True, **overrides
    )
    model.eval()
    assert set(info["missing_keys"]) >= set(model.adapter_parameter_names())
    assert not info["unexpected_keys"]
    with torch.no_grad():
        expected, actual = sam(**inputs()).pred_masks, model(**inputs()).pred_masks
    assert (expected - actual).abs().max() < 1e-4
    # ...while the paper init does change the output: the adapters are live.
    paper = DBSamModel.from_pretrained(folder, adapter_variant=variant, **overrides).eval()
    with torch.no_grad():
        assert (paper(**inputs()).pred_masks - expected).abs().max() > 1e-3


def test_identity_init_is_refused_where_the_variant_cannot_reproduce_sam():
    # The authors' LayerNorm before SAM's neck removes each token's mean: no init makes it the identity.
    with pytest.raises(ValueError, match="adapter_init='identity' cannot reproduce SAM with fusion_layer_norm=True"):
        DBSamConfig(**tiny_sam_config_dict(), adapter_variant="authors", adapter_init="identity")
    # Without fusion there is no such LayerNorm, so the ablation rows keep identity init.
    config = DBSamConfig(**tiny_sam_config_dict(), adapter_variant="authors", adapter_init="identity", **ALL_OFF)
    assert config.fusion_layer_norm is True


def test_paper_init_gives_adapters_their_intended_scale(sam_checkpoint):
    folder, _ = sam_checkpoint
    model = DBSamModel.from_pretrained(folder)
    parameters = dict(model.named_parameters())
    # trunc_normal(0.02) for linear layers, not the vision config's initializer_range of 1e-10.
    fc1 = parameters["vision_encoder.cross_attention.1.vit_from_conv.ffn.fc1.weight"]
    assert 0.015 < fc1.std().item() < 0.025
    # Kaiming (fan_out) for convolutions: std = sqrt(2 / (out_channels * k * k)).
    conv = parameters["vision_encoder.conv_branch.layers.3.weight"]
    expected = (2.0 / (conv.shape[0] * 9)) ** 0.5
    assert abs(conv.std().item() - expected) / expected < 0.1
    # Deformable DETR: zero offset weights, radial offset biases growing with the point index.
    attention = model.vision_encoder.cross_attention["1"].vit_from_conv.attention
    assert torch.count_nonzero(attention.sampling_offsets.weight) == 0
    bias = attention.sampling_offsets.bias.view(attention.num_heads, attention.num_points, 2)
    assert torch.allclose(bias[:, -1], bias[:, 0] * attention.num_points)
    for name in model.adapter_parameter_names():
        zero_by_design = ("sampling_offsets", "attention_weights")
        if name.endswith("weight") and parameters[name].dim() > 1 and not any(z in name for z in zero_by_design):
            assert parameters[name].std() > 1e-3, name


def test_deformable_attention_samples_where_the_offsets_point():
    torch.manual_seed(0)
    attention = DBSamDeformableAttention(hidden_size=8, num_heads=2, num_points=3)
    for layer in (attention.sampling_offsets, attention.attention_weights):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    for layer in (attention.value_proj, attention.output_proj):
        torch.nn.init.eye_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    query, value = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    # Zero offsets: every point samples its own pixel centre exactly.
    assert torch.allclose(attention(query, value), value, atol=1e-6)
    # An offset of one pixel in x reads the right-hand neighbour; zero padding past the border.
    with torch.no_grad():
        attention.sampling_offsets.bias.view(2, 3, 2)[..., 0] = 1.0
    shifted = attention(query, value)
    assert torch.allclose(shifted[:, :, :-1], value[:, :, 1:], atol=1e-6)
    assert torch.allclose(shifted[:, :, -1], torch.zeros_like(shifted[:, :, -1]), atol=1e-6)


def test_gradients_reach_exactly_the_trainable_set():
    torch.manual_seed(0)
    model = tiny_dbsam(**NO_DROP)
    count = model.freeze_for_training()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(model.adapter_parameter_names()) <= trainable
    assert any(name.startswith("vision_encoder.neck.") for name in trainable)
    assert not any(name.startswith(("vision_encoder.layers.", "prompt_encoder.")) for name in trainable)
    assert "vision_encoder.pos_embed" not in trainable
    assert "mask_decoder.output_hypernetworks_mlps.0.proj_in.weight" in trainable
    assert not any(
        name.startswith(("mask_decoder.output_hypernetworks_mlps.1.", "mask_decoder.iou_prediction_head."))
        for name in trainable
    )
    model.train()
    model(**inputs()).pred_masks.sigmoid().mean().backward()  # one mask per box, as in training
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name


def test_single_mask_training_reaches_every_trainable_weight_and_no_frozen_decoder_head():
    """With every weight non-zero (no zero-initialised projection hiding a path), a one-mask-per-box loss gives
    each trainable parameter a gradient, and the frozen multimask and IoU heads exactly none: trainable, only
    weight decay would move them."""
    model = scrambled_tiny_dbsam()
    trainable = set(model.trainable_parameter_names())
    model.requires_grad_(True)
    model(**inputs()).pred_masks.sigmoid().mean().backward()
    for name, parameter in model.named_parameters():
        reached = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        if name in trainable:
            assert reached, f"trainable {name} gets no gradient"
        elif name.startswith(("mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head.")):
            assert not reached, f"frozen {name} would get a gradient"


def test_train_neck_false_freezes_the_neck():
    model = tiny_dbsam(train_neck=False)
    model.freeze_for_training()
    assert not any(p.requires_grad for p in model.vision_encoder.neck.parameters())


def test_frozen_weights_never_change_in_an_optimizer_step():
    torch.manual_seed(0)
    model = tiny_dbsam()
    model.freeze_for_training()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model.train()
    model(**inputs()).pred_masks.sigmoid().mean().backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        if not parameter.requires_grad:
            assert not changed, name
    assert not torch.equal(before["mask_decoder.iou_token.weight"], model.mask_decoder.iou_token.weight)


def test_save_load_round_trip_and_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = tiny_dbsam(adapter_init="paper", deformable_num_points=2).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dbsam" and config["deformable_num_points"] == 2
    assert (tmp_path / "model.safetensors").exists()
    with torch.no_grad():
        expected = model(**inputs()).pred_masks
        for loader in (DBSamModel, AutoModel, AutoModelForMaskGeneration):
            loaded = loader.from_pretrained(tmp_path).eval()
            assert type(loaded) is DBSamModel
            assert torch.equal(loaded(**inputs()).pred_masks, expected)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DBSamConfig


def test_sam_config_becomes_dbsam_and_kwargs_override_adapter_fields(sam_checkpoint):
    folder, _ = sam_checkpoint
    config = DBSamConfig.from_pretrained(folder)
    assert config.model_type == "dbsam" and config.to_dict()["model_type"] == "dbsam"
    model = DBSamModel.from_pretrained(folder, use_fusion=False, deformable_num_heads=4)
    assert model.config.use_fusion is False and model.vision_encoder.fusion is None
    assert model.vision_encoder.cross_attention["1"].vit_from_conv.attention.num_heads == 4


@pytest.mark.parametrize(
    ("size", "width", "depth", "heads", "global_layers"),
    [("B", 768, 12, 12, [2, 5, 8, 11]), ("L", 1024, 24, 16, [5, 11, 17, 23]), ("H", 1280, 32, 16, [7, 15, 23, 31])],
)
def test_defaults_derive_from_the_backbone(size, width, depth, heads, global_layers):
    vision = SamVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, global_attn_indexes=global_layers
    )
    config = DBSamConfig(vision_config=vision.to_dict())
    assert config.stage_end_indexes == global_layers
    assert config.channel_attention_indexes == global_layers
    assert config.deformable_num_heads == heads
    assert config.conv_input_size == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage_end_indexes": [1, 5]}, "out of range"),
        ({"channel_attention_indexes": [-1]}, "out of range"),
        ({"deformable_num_heads": 3}, "does not divide the ViT width 32"),
        ({"conv_input_size": 32}, "must be 64"),
        ({"adapter_init": "xavier"}, "unknown adapter_init 'xavier'"),
        ({"use_conv_branch": False}, "use_fusion=True needs use_conv_branch=True"),
        ({"adapter_drop_path_rate": 1.5}, "adapter_drop_path_rate"),
        ({"conv_branch_channels": [8, 8]}, "conv_branch_channels"),
        ({"adapter_variant": "release"}, "unknown adapter_variant 'release'"),
        ({"conv_branch_kernel_sizes": [3, 3, 3, 1]}, "conv_branch_kernel_sizes must order two 3x3"),
        ({"se_activation": "relu"}, "unknown se_activation 'relu'"),
        ({"se_divisor": 0}, "se_divisor must be >= 1"),
        ({"conv_branch_batch_norm_momentum": 2.0}, "conv_branch_batch_norm_momentum"),
        ({"adapter_layer_norm_eps": 0.0}, "adapter_layer_norm_eps must be positive"),
        ({"fusion_ffn_ratio": -1.0}, "fusion_ffn_ratio must be >= 0"),
        ({"bca_attention_dropout": 1.0}, "bca_attention_dropout must be in"),
    ],
)
def test_config_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DBSamConfig(**tiny_sam_config_dict(), **kwargs)


@pytest.mark.parametrize("switches", TABLE3_ROWS, ids=["baseline", "+cab", "+cab+bca", "+cab+bca+fusion"])
def test_each_table3_row_builds_trains_and_runs(switches):
    torch.manual_seed(0)
    model = tiny_dbsam(**switches, **NO_DROP)
    model.freeze_for_training()
    output = model(**inputs())
    assert output.pred_masks.shape == (2, 1, 1, 64, 64)
    output.pred_masks.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    encoder = model.vision_encoder
    assert (len(encoder.channel_attention) > 0) == switches["use_channel_attention"]
    assert (encoder.conv_branch is not None) == switches["use_conv_branch"]
    assert (encoder.fusion is not None) == switches["use_fusion"]


def test_activation_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> tuple[dict, int]:
        torch.manual_seed(0)
        model = tiny_dbsam()  # drop path and dropout 0.4 on: checkpointing must replay the same randomness
        model.freeze_for_training()
        calls = []
        for module in model.modules():
            if isinstance(module, DBSamChannelAttentionBlock):
                module.layer_norm.register_forward_hook(lambda *_: calls.append(1))  # runs on recompute too
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        torch.manual_seed(1)
        model(**inputs()).pred_masks.sigmoid().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert checkpointed_calls > plain_calls  # the blocks really were recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_conv_pixel_values_and_embeddings_paths_agree():
    torch.manual_seed(0)
    model = tiny_dbsam().eval()
    batch = inputs()
    with torch.no_grad():
        expected = model(**batch).pred_masks
        conv = model.vision_encoder.conv_input(batch["pixel_values"])
        assert conv.shape == (2, 3, 64, 64)
        assert torch.equal(model(**batch, conv_pixel_values=conv).pred_masks, expected)
        embeddings = model.get_image_embeddings(batch["pixel_values"])
        by_embedding = model(
            image_embeddings=embeddings, input_boxes=batch["input_boxes"], multimask_output=False
        ).pred_masks
    assert torch.equal(by_embedding, expected)


def test_bf16_autocast_forward_is_finite_and_close():
    torch.manual_seed(0)
    model = tiny_dbsam().eval()
    with torch.no_grad():
        reference = model(**inputs()).pred_masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**inputs()).pred_masks.float()
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"pixel_values": torch.zeros(1, 3, 64, 64)},
            r"pixel_values must have shape \(batch, 3, 32, 32\), got \(1, 3, 64, 64\)",
        ),
        ({"pixel_values": torch.zeros(1, 1, 32, 32)}, r"got \(1, 1, 32, 32\)"),
        ({"conv_pixel_values": torch.zeros(1, 3, 32, 32)}, r"conv_pixel_values must have shape \(1, 3, 64, 64\)"),
        (
            {"input_boxes": torch.zeros(1, 4)},
            r"input_boxes must have shape \(batch, boxes_per_image, 4\), got \(1, 4\)",
        ),
        ({"input_boxes": torch.zeros(1, 1, 5)}, r"got \(1, 1, 5\)"),
    ],
)
def test_bad_input_names_expected_and_actual_shapes(override, message):
    model = tiny_dbsam().eval()
    batch = {**inputs(batch=1), **override}
    with pytest.raises(ValueError, match=message):
        model(**batch)


def test_float64_boxes_from_the_processor_are_accepted():
    model = tiny_dbsam().eval()
    batch = inputs()
    with torch.no_grad():
        expected = model(**batch).pred_masks
        batch["input_boxes"] = batch["input_boxes"].double()
        assert torch.equal(model(**batch).pred_masks, expected)


def test_fusion_mixes_streams_with_the_gate_of_eq2():
    from modeling_dbsam.modeling_dbsam import DBSamFusion

    fusion = DBSamFusion(DBSamConfig(**tiny_sam_config_dict()))
    with torch.no_grad():
        for gate in (fusion.deep_gate, fusion.shallow_gate):
            gate[2].weight.zero_()
            gate[2].bias.zero_()
        fusion.deep_gate[2].bias.fill_(1.0)
        fusion.shallow_gate[2].bias.fill_(-3.0)
    deep, shallow = torch.randn(1, 4, 4, 32), torch.randn(1, 4, 4, 32)
    mask = torch.sigmoid(torch.tensor(1.0 - 3.0))
    torch.testing.assert_close(fusion(deep, shallow), deep * mask + shallow * (1 - mask))


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every weight, bias and norm parameter random, so that a swapped or dropped term shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_channel_attention_computes_eq1_from_its_weights(variant):
    """Eq. 1 written out with functional ops on the block's parameters, in the equation's order:
    F + Conv1x1(SE(GELU(DWConv3x3(LN(F))))), SE = x * sigmoid(excite(act(squeeze(mean(x)))))."""
    config = DBSamConfig(**tiny_sam_config_dict(), adapter_variant=variant, adapter_drop_path_rate=0.0)
    block = DBSamChannelAttentionBlock(config).eval()
    _randomize(block)
    w = dict(block.named_parameters())
    b = {name: w.get(f"{name}.bias") for name in ("depthwise", "squeeze", "excite", "pointwise")}
    hidden = torch.randn(2, 5, 6, 32)
    normed = F.layer_norm(hidden, (32,), w["layer_norm.weight"], w["layer_norm.bias"], eps=1e-6)
    x = F.conv2d(normed.permute(0, 3, 1, 2), w["depthwise.weight"], b["depthwise"], padding=1, groups=32)
    x = F.gelu(x)
    act = F.silu if variant == "paper" else F.gelu
    pooled = x.mean(dim=(2, 3), keepdim=True)
    gate = torch.sigmoid(
        F.conv2d(act(F.conv2d(pooled, w["squeeze.weight"], b["squeeze"])), w["excite.weight"], b["excite"])
    )
    expected = hidden + F.conv2d(x * gate, w["pointwise.weight"], b["pointwise"]).permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(block(hidden), expected)
    assert (b["pointwise"] is None) == (variant == "authors")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fusion_computes_eq2_from_its_weights(variant):
    """Eq. 2 with functional ops: A = FC(GELU(FC(F))) per branch, M = sigmoid(A_d + A_s),
    F_d * M + F_s * (1 - M); the authors' variant then adds x + FFN(LN(x)) and a final LN."""
    from modeling_dbsam.modeling_dbsam import DBSamFusion

    config = DBSamConfig(**tiny_sam_config_dict(), adapter_variant=variant, adapter_drop_path_rate=0.0)
    fusion = DBSamFusion(config).eval()
    _randomize(fusion, seed=1)
    w = dict(fusion.named_parameters())
    deep, shallow = torch.randn(2, 4, 5, 32), torch.randn(2, 4, 5, 32)

    def attention(features, prefix):
        hidden = F.gelu(F.linear(features, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"]))
        return F.linear(hidden, w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"])

    mask = torch.sigmoid(attention(deep, "deep_gate") + attention(shallow, "shallow_gate"))
    expected = deep * mask + shallow * (1 - mask)
    if variant == "authors":
        normed = F.layer_norm(expected, (32,), w["ffn_norm.weight"], w["ffn_norm.bias"], eps=1e-5)
        hidden = F.gelu(F.linear(normed, w["ffn.fc1.weight"], w["ffn.fc1.bias"]))
        expected = expected + F.linear(hidden, w["ffn.fc2.weight"], w["ffn.fc2.bias"])
        expected = F.layer_norm(expected, (32,), w["output_norm.weight"], w["output_norm.bias"], eps=1e-5)
    else:
        assert fusion.ffn is None and fusion.output_norm is None
    with torch.no_grad():
        torch.testing.assert_close(fusion(deep, shallow), expected)


def test_variant_parameter_counts_and_shapes_at_vit_b():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    def conv_branch(widths, kernels, projection_bias, level_embedding):
        convs = [c_in * c_out * k * k for c_in, c_out, k in zip([3, *widths], widths, kernels)]
        projection = widths[-1] * 768 + (768 if projection_bias else 0)
        return sum(convs) + 2 * sum(widths) + projection + (768 if level_embedding else 0)

    gates = 2 * (768 * 64 + 64 + 64 * 768 + 768)
    ffn = 768 * 3072 + 3072 + 3072 * 768 + 768
    expected = {
        # channel attention (LN + dw3x3 + SE 768 -> 192 -> 768 + pw), conv branch, fusion
        "paper": (
            1536 + 768 * 10 + (768 * 192 + 192) + (192 * 768 + 768) + (768 * 768 + 768),
            conv_branch([64, 128, 256, 256], [3, 3, 1, 1], True, False),
            gates,
        ),
        "authors": (
            1536 + 768 * 9 + 768 * 192 * 2 + 768 * 768,
            conv_branch([256, 256, 512, 512], [3, 1, 3, 1], False, True),
            gates + 1536 + ffn + 1536,
        ),
    }
    for variant, (cab, conv, fusion) in expected.items():
        with torch.device("meta"):
            encoder = DBSamModel(DBSamConfig(adapter_variant=variant)).vision_encoder
        assert count(encoder.channel_attention["2"]) == cab
        assert count(encoder.conv_branch) == conv
        assert count(encoder.fusion) == fusion
        half = encoder.cross_attention["2"].vit_from_conv
        assert half.query_norm.eps == (1e-6 if variant == "paper" else 1e-5)
        assert half.attention_dropout.p == (0.0 if variant == "paper" else 0.1)
        assert half.ffn.dropout.p == (0.4 if variant == "paper" else 0.1)
        batch_norm = encoder.conv_branch.layers[1]
        assert batch_norm.momentum == (0.1 if variant == "paper" else 0.01)
    # About 1.9 M parameters in the authors' conv branch against 0.37 M in the paper variant.
    assert (conv_branch([64, 128, 256, 256], [3, 3, 1, 1], True, False), conv) == (372_544, 1_911_296)
    layers = encoder.conv_branch.layers  # authors: 3x3 s2 -> 1x1 -> 3x3 s2 -> 1x1, widths 256/256/512/512
    shapes = [tuple(layers[i].weight.shape) for i in (0, 3, 6, 9)]
    assert shapes == [(256, 3, 3, 3), (256, 256, 1, 1), (512, 256, 3, 3), (512, 512, 1, 1)]
    assert [layers[i].stride for i in (0, 3, 6, 9)] == [(2, 2), (1, 1), (2, 2), (1, 1)]
    assert encoder.conv_branch.projection.bias is None


def test_variant_fields_can_be_set_one_by_one_and_round_trip(tmp_path):
    config = DBSamConfig(
        **tiny_sam_config_dict(), adapter_variant="authors", se_activation="silu", conv_branch_channels=[8, 8, 16, 16]
    )
    assert (config.se_activation, config.conv_branch_channels) == ("silu", [8, 8, 16, 16])
    assert (config.conv_branch_kernel_sizes, config.fusion_ffn_ratio, config.se_divisor) == ([3, 1, 3, 1], 4.0, 8)
    paper = DBSamConfig(**tiny_sam_config_dict(), fusion_layer_norm=True)
    assert paper.fusion_layer_norm is True and paper.fusion_ffn_ratio == 0.0 and paper.se_activation == "silu"
    model = DBSamModel(config)
    model.save_pretrained(tmp_path)
    loaded = DBSamModel.from_pretrained(tmp_path)
    from modeling_dbsam.configuration_dbsam import VARIANT_DEFAULTS

    for name in VARIANT_DEFAULTS["authors"]:
        assert getattr(loaded.config, name) == getattr(config, name), name
    # Switching the variant of a saved DB-SAM config replaces the old variant's values, except those given.
    switched = DBSamConfig.from_pretrained(tmp_path, adapter_variant="paper", conv_branch_channels=[4, 4, 8, 8])
    assert (switched.se_activation, switched.fusion_ffn_ratio, switched.conv_branch_channels) == (
        "silu",
        0.0,
        [4, 4, 8, 8],
    )
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, loaded.state_dict()[name]), name


def test_depthwise_init_divides_fan_out_by_groups():
    block = DBSamChannelAttentionBlock(DBSamConfig())  # ViT-B width 768
    block.init_adapter_weights("paper")
    # timm / the authors: std = sqrt(2 / (9 * 768 / 768)) = 0.471; PyTorch's kaiming fan_out would give 0.017.
    assert abs(block.depthwise.weight.std().item() - (2 / 9) ** 0.5) < 0.02
    assert abs(block.pointwise.weight.std().item() - (2 / 768) ** 0.5) < 0.002


def test_forward_keeps_sam_positional_order_and_annotates_its_return():
    sam_parameters = list(inspect.signature(SamModel.forward).parameters.values())
    parameters = list(inspect.signature(DBSamModel.forward).parameters.values())
    positional = [p for p in sam_parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in parameters[: len(positional)]] == [(p.name, p.default) for p in positional]
    assert parameters[len(positional)].name == "conv_pixel_values"
    assert inspect.signature(DBSamModel.forward).return_annotation in (
        SamImageSegmentationOutput,
        "SamImageSegmentationOutput",
    )
    model = scrambled_tiny_dbsam().eval()
    batch = inputs()
    points, labels = torch.tensor([[[[10.0, 12.0]]], [[[20.0, 8.0]]]]), torch.ones(2, 1, 1, dtype=torch.long)
    with torch.no_grad():
        by_keyword = model(pixel_values=batch["pixel_values"], input_points=points, input_labels=labels)
        by_position = model(batch["pixel_values"], points, labels)
        boxes_by_position = model(batch["pixel_values"], None, None, batch["input_boxes"], None, None, False)
        boxes_by_keyword = model(**batch)
    torch.testing.assert_close(by_position.pred_masks, by_keyword.pred_masks, rtol=0, atol=0)
    torch.testing.assert_close(boxes_by_position.pred_masks, boxes_by_keyword.pred_masks, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_runs_in_float64_and_bfloat16_weights(dtype):
    torch.manual_seed(0)
    model = tiny_dbsam().eval()
    batch = inputs()
    with torch.no_grad():
        reference = model(**batch).pred_masks
        model = model.to(dtype)
        output = model(**{**batch, "pixel_values": batch["pixel_values"].to(dtype)}).pred_masks
    assert output.dtype == dtype
    tolerance = 1e-9 if dtype == torch.float64 else 0.1 * reference.abs().max().item() + 0.05
    assert (output.float() - reference).abs().max() < max(tolerance, 1e-5)
