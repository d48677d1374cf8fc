"""Conversion of original-format SAM/MedSAM and transformers SAM checkpoints, model cards and Hub upload.

Original-format checkpoints are built here with Meta's ``segment_anything`` classes at tiny sizes and
saved with ``torch.save`` exactly as Meta and MedSAM do; Meta's forward is the independent reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import convert_sam_to_dbsam
import dbsam_card
import numpy as np
import push_to_hub
import pytest
import sam_parity
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from tiny import tiny_processor, tiny_sam_config
from transformers import SamModel, SamProcessor

from modeling_dbsam import DBSamModel, convert

ADAPTERS_OFF = {"use_channel_attention": False, "use_conv_branch": False, "use_fusion": False}
# The non-standard size, and a second shape with ViT-B's layout of layers scaled down.
NON_STANDARD = {"width": 48, "depth": 3, "heads": 3, "global_layers": (0, 2), "image": 64, "patch": 8}
NON_STANDARD |= {"window": 4, "iou_depth": 4}
SMALL_B_LAYOUT = {"width": 32, "depth": 4, "heads": 2, "global_layers": (1, 3), "image": 48, "patch": 4}
SMALL_B_LAYOUT |= {"window": 5, "iou_depth": 3}
PROMPT_DIM, DECODER_HEADS = 16, 2


class NotAStateDict:
    """Unpickling this needs this test module's code: exactly what weights_only loading refuses."""

    def __init__(self):
        self.weights = torch.zeros(2)


def meta_sam(width, depth, heads, global_layers, image, patch, window, iou_depth, seed=0, device=None):
    """Meta's SAM at the given sizes with every weight random (rel-pos tables included)."""
    modeling = sam_parity.import_meta_modeling()
    torch.manual_seed(seed)
    grid = image // patch
    with torch.device(device or "cpu"):
        sam = modeling.Sam(
            image_encoder=modeling.ImageEncoderViT(
                img_size=image,
                patch_size=patch,
                embed_dim=width,
                depth=depth,
                num_heads=heads,
                mlp_ratio=4,
                out_chans=PROMPT_DIM,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                global_attn_indexes=global_layers,
                window_size=window,
            ),
            prompt_encoder=modeling.PromptEncoder(
                embed_dim=PROMPT_DIM,
                image_embedding_size=(grid, grid),
                input_image_size=(image, image),
                mask_in_chans=4,
            ),
            mask_decoder=modeling.MaskDecoder(
                num_multimask_outputs=3,
                transformer=modeling.TwoWayTransformer(
                    depth=2, embedding_dim=PROMPT_DIM, mlp_dim=32, num_heads=DECODER_HEADS
                ),
                transformer_dim=PROMPT_DIM,
                iou_head_depth=iou_depth,
                iou_head_hidden_dim=24,
            ),
        )
    if device is None:
        with torch.no_grad():
            for parameter in sam.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return sam.eval()


@torch.no_grad()
def meta_low_res_logits(sam, pixel_values, box, point) -> torch.Tensor:
    """Meta's own forward: image encoder, prompt encoder, mask decoder (all four mask tokens)."""
    embeddings = sam.image_encoder(pixel_values)
    sparse, dense = sam.prompt_encoder(points=(point, torch.ones(1, 1)), boxes=box, masks=None)
    outputs = [
        sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask)[0]
        for multimask in (False, True)
    ]
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def hf_low_res_logits(model, pixel_values, box, point) -> torch.Tensor:
    outputs = [
        model(
            pixel_values=pixel_values,
            input_boxes=box[None],
            input_points=point[None],
            input_labels=torch.ones(1, 1, 1, dtype=torch.long),
            multimask_output=multimask,
        ).pred_masks[:, 0]
        for multimask in (False, True)
    ]
    return torch.cat(outputs, dim=1)


def run_converter(capsys, *argv) -> tuple[int, str, str]:
    code = convert_sam_to_dbsam.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_parity(out: str) -> float:
    match = re.search(r"parity, adapters off, float64, against .*, max abs diff: .*mask logits ([0-9.e+-]+),", out)
    assert match, out
    return float(match.group(1))


@dataclass
class Converted:
    folder: Path
    sam: torch.nn.Module
    stdout: str


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Converted:
    """The non-standard model saved as MedSAM's training code saves it ({"model": ..., "epoch": ...}),
    converted with identity adapters and small shards; shared by the tests that read a converted folder."""
    root = tmp_path_factory.mktemp("converted")
    sam = meta_sam(**NON_STANDARD)
    torch.save({"model": sam.state_dict(), "epoch": 3}, root / "tiny_medsam.pth")
    argv = ["--checkpoint", str(root / "tiny_medsam.pth"), "--output-dir", str(root / "out")]
    argv += ["--decoder-num-heads", str(DECODER_HEADS), "--adapter-init", "identity", "--max-shard-size", "300KB"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert convert_sam_to_dbsam.main(argv) == 0
    return Converted(root / "out", sam, stdout.getvalue())


@pytest.fixture
def no_network(monkeypatch):
    """Every HfApi method and every socket connection fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    for name in dir(HfApi):
        if not name.startswith("_") and callable(getattr(HfApi, name)):
            monkeypatch.setattr(HfApi, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_architecture_is_inferred_from_the_tensors():
    state_dict = meta_sam(**NON_STANDARD).state_dict()
    config = convert.infer_sam_config(state_dict, decoder_num_heads=DECODER_HEADS)
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (48, 3, 3)
    assert (vision.image_size, vision.patch_size, vision.window_size) == (64, 8, 4)
    assert list(vision.global_attn_indexes) == [0, 2]
    assert (vision.mlp_dim, vision.output_channels, vision.num_pos_feats) == (192, PROMPT_DIM, PROMPT_DIM // 2)
    assert (prompt.hidden_size, prompt.image_size, prompt.mask_input_channels) == (PROMPT_DIM, 64, 4)
    assert (decoder.num_hidden_layers, decoder.mlp_dim, decoder.iou_head_depth, decoder.iou_head_hidden_dim) == (
        2,
        32,
        4,
        24,
    )
    assert decoder.num_attention_heads == DECODER_HEADS


@pytest.mark.parametrize(
    "size, expected",
    [
        ((768, 12, 12, (2, 5, 8, 11)), (12, [2, 5, 8, 11])),
        ((1024, 24, 16, (5, 11, 17, 23)), (16, [5, 11, 17, 23])),
        ((1280, 32, 16, (7, 15, 23, 31)), (16, [7, 15, 23, 31])),
    ],
    ids=["vit-b", "vit-l", "vit-h"],
)
def test_sam_release_sizes_are_inferred_without_allocating(size, expected):
    width, depth, heads, global_layers = size
    sam = meta_sam(width, depth, heads, global_layers, image=1024, patch=16, window=14, iou_depth=3, device="meta")
    config = convert.infer_sam_config(sam.state_dict(), decoder_num_heads=DECODER_HEADS)
    vision = config.vision_config
    assert (vision.num_attention_heads, list(vision.global_attn_indexes)) == expected
    assert (vision.image_size, vision.window_size, vision.mlp_dim) == (1024, 14, 4 * width)


def check_round_trip(out: Path, sam: torch.nn.Module, stdout: str, size: dict) -> None:
    assert printed_parity(stdout) < 1e-10  # float64 on both sides, on shared prompt embeddings
    model = DBSamModel.from_pretrained(out, **ADAPTERS_OFF).eval()
    # Every original tensor arrives unchanged under its transformers name.
    saved = model.state_dict()
    mapping = {
        "image_encoder.blocks.1.attn.rel_pos_h": "vision_encoder.layers.1.attn.rel_pos_h",
        "image_encoder.blocks.2.norm2.weight": "vision_encoder.layers.2.layer_norm2.weight",
        "image_encoder.neck.3.bias": "vision_encoder.neck.layer_norm2.bias",
        "prompt_encoder.mask_downscaling.4.weight": "prompt_encoder.mask_embed.layer_norm2.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": "shared_image_embedding.positional_embedding",
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": "mask_decoder.output_hypernetworks_mlps.3.proj_out.weight",
        "mask_decoder.iou_prediction_head.layers.1.bias": "mask_decoder.iou_prediction_head.layers.0.bias",
        f"mask_decoder.iou_prediction_head.layers.{size['iou_depth'] - 1}.weight": "mask_decoder.iou_prediction_head.proj_out.weight",
        "mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.layer_norm_final_attn.weight",
    }
    original = sam.state_dict()
    for meta_key, hf_key in mapping.items():
        assert torch.equal(saved[hf_key], original[meta_key]), hf_key
    # Independent of the converter's own check: Meta's forward against the saved model, adapters off, float32.
    image = size["image"]
    pixel_values = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    box, point = torch.tensor([[5.0, 8.0, 0.6 * image, 0.9 * image]]), torch.tensor([[[0.3 * image, 0.4 * image]]])
    expected = meta_low_res_logits(sam, pixel_values, box, point)
    actual = hf_low_res_logits(model, pixel_values, box, point)
    assert expected.shape == actual.shape == (1, 4, 4 * image // size["patch"], 4 * image // size["patch"])
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_round_trip_of_the_non_standard_size(converted):
    check_round_trip(converted.folder, converted.sam, converted.stdout, NON_STANDARD)


def test_vit_b_layout_round_trip_replaces_an_existing_folder_only_with_overwrite(tmp_path, capsys):
    sam = meta_sam(**SMALL_B_LAYOUT)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("--checkpoint", tmp_path / "sam.pth", "--output-dir", out, "--decoder-num-heads", DECODER_HEADS)
    code, _, stderr = run_converter(capsys, *args)
    assert code == 2 and "exists" in stderr and "--overwrite" in stderr
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, stderr = run_converter(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folders left behind
    check_round_trip(out, sam, stdout, SMALL_B_LAYOUT)


def test_processor_matches_meta_preprocessing(converted):
    out, sam = converted.folder, converted.sam
    processor = SamProcessor.from_pretrained(out)
    image = np.random.default_rng(0).integers(0, 256, size=(64, 40, 3), dtype=np.uint8)  # already at model scale
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    expected = sam.preprocess(torch.from_numpy(image).permute(2, 0, 1).float())[None]
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)


def test_converted_model_shares_the_source_tensors():
    state_dict = meta_sam(**NON_STANDARD).state_dict()
    config = convert.infer_sam_config(state_dict, decoder_num_heads=DECODER_HEADS)
    weights = convert.convert_original_state_dict(state_dict, config)
    model = convert_sam_to_dbsam.build_dbsam(convert_sam_to_dbsam.dbsam_config(config, {}), weights)
    parameters = dict(model.state_dict())
    assert all(parameters[key].data_ptr() == tensor.data_ptr() for key, tensor in weights.items())


def test_wrapped_checkpoint_is_sharded_with_identity_adapters(converted):
    shards = sorted(converted.folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (converted.folder / "model.safetensors.index.json").is_file()
    assert json.loads((converted.folder / "config.json").read_text())["adapter_init"] == "identity"
    match = re.search(
        r"identity init, adapters on against adapters off, max abs diff: .*mask logits ([0-9.e+-]+),", converted.stdout
    )
    assert match and float(match.group(1)) < 1e-4


def test_pickles_that_need_code_are_refused(tmp_path, capsys):
    torch.save({"model": NotAStateDict()}, tmp_path / "object.pth")
    code, _, stderr = run_converter(capsys, "--checkpoint", tmp_path / "object.pth", "--output-dir", tmp_path / "out")
    assert code == 2
    assert "pickled Python objects (test_conversion.NotAStateDict)" in stderr
    assert "torch.save(model.state_dict()" in stderr and not (tmp_path / "out").exists()
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    code, _, stderr = run_converter(capsys, "--checkpoint", tmp_path / "notes.pth", "--output-dir", tmp_path / "out")
    assert code == 2 and "not a readable PyTorch checkpoint" in stderr


def test_unknown_missing_and_misshapen_keys_are_listed():
    state_dict = dict(meta_sam(**NON_STANDARD).state_dict())
    state_dict["image_encoder.adapter.weight"] = torch.zeros(3)
    del state_dict["mask_decoder.iou_token.weight"]
    state_dict["image_encoder.blocks.1.mlp.lin2.bias"] = torch.zeros(7)
    config = convert.infer_sam_config(state_dict, decoder_num_heads=DECODER_HEADS)
    with pytest.raises(ValueError) as error:
        convert.convert_original_state_dict(state_dict, config)
    message = str(error.value)
    assert "unknown keys (1):\n  image_encoder.adapter.weight" in message
    assert "missing keys (1):\n  mask_decoder.iou_token.weight" in message
    assert "image_encoder.blocks.1.mlp.lin2.bias: checkpoint (7,), model (48,)" in message


def test_transformers_sam_folder_converts_with_samodel_as_reference(tmp_path, capsys):
    torch.manual_seed(0)
    sam = SamModel(tiny_sam_config())
    with torch.no_grad():
        for parameter in sam.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    sam.save_pretrained(tmp_path / "sam")
    tiny_processor().save_pretrained(tmp_path / "sam")
    code, stdout, stderr = run_converter(
        capsys, "--checkpoint", tmp_path / "sam", "--output-dir", tmp_path / "out", "--no-conv-branch"
    )
    assert code == 0, stderr
    assert "against transformers SamModel" in stdout and printed_parity(stdout) < 1e-10
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "dbsam" and config["use_conv_branch"] is False and config["use_fusion"] is False
    saved = DBSamModel.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in sam.state_dict().items():
        assert torch.equal(saved[key], tensor), key
    processor = json.loads((tmp_path / "out" / "processor_config.json").read_text())["image_processor"]
    assert processor["pad_size"] == {"height": 32, "width": 32}
    # A DB-SAM folder is not converted again.
    code, _, stderr = run_converter(capsys, "--checkpoint", tmp_path / "out", "--output-dir", tmp_path / "again")
    assert code == 2 and "already a DB-SAM checkpoint" in stderr


def test_converted_card_metadata_parses_back(converted):
    out = converted.folder
    data = ModelCard.load(out / "README.md").data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "mask-generation", "apache-2.0")
    assert "dbsam" in data.tags and "medical-imaging" in data.tags
    text = (out / "README.md").read_text()
    assert "Not a medical device" in text and "Qin, Chao and Cao, Jiale and Fu, Huazhu" in text
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"] == "tiny_medsam.pth"  # the user's folders stay private
    assert f"{record['parity']['mask_logits']:.2g}" in text


def test_card_usage_snippet_runs(converted, tmp_path, monkeypatch):
    out = converted.folder
    text = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace(f'"{out.name}"', f'"{out}"')
    Image.fromarray(np.full((120, 100, 3), 90, dtype=np.uint8)).save(tmp_path / "slice.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(snippet, namespace)
    assert namespace["mask"].shape == (120, 100) and namespace["mask"].dtype == bool


def write_training_evaluation(folder: Path) -> None:
    """An evaluation entry as training writes it (the evaluation module's aggregate format)."""
    protocol = {"name": "paper", "tolerance": 1.0, "summary": "paper: 256x256 grid, unit spacing, NSD tolerance 1 px"}
    tasks = [
        {"task": "Liver", "modality": "CT", "dimension": "3D", "cases": 3, "dsc": 0.9, "nsd": 0.8, "units": "px"},
        {"task": "Lungs", "modality": "X-Ray", "dimension": "2D", "cases": 5, "dsc": 0.95, "nsd": None},
    ]
    averages = {"3D": {"tasks": 1, "dsc": 0.9, "nsd": 0.8}, "2D": {"tasks": 1, "dsc": 0.95}}
    evaluation = {"step": 120, "protocol": protocol, "metrics": {"dsc": 0.925}, "tasks": tasks, "averages": averages}
    (folder / "eval_results.json").write_text(json.dumps(evaluation))


def trained_folder(converted, tmp_path) -> Path:
    folder = tmp_path / "trained"
    shutil.copytree(converted.folder, folder)
    write_training_evaluation(folder)
    (folder / "training_config.yaml").write_text("model: facebook/sam-vit-base\nlearning_rate: 0.0001\nepochs: 12\n")
    (folder / "optimizer.bin").write_bytes(b"\0" * 10)
    (folder / "checkpoints").mkdir()
    return folder


def test_dry_run_prints_files_and_card_without_network(converted, tmp_path, capsys, no_network):
    folder = trained_folder(converted, tmp_path)
    code = push_to_hub.main(
        [str(folder), "--repo-id", "me/dbsam-tiny", "--private", "--dry-run", "--dataset", "me/medsam30"]
    )
    out = capsys.readouterr().out
    assert code == 0
    listed = re.findall(r"^  (\S+)  \(", out, re.M)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert listed == ["README.md", "config.json", "conversion.json", "eval_results.json", *shards] + [
        "model.safetensors.index.json",
        "processor_config.json",
        "training_config.yaml",
    ]
    assert re.findall(r"^skipped.*$", out, re.M) == ["skipped (not part of a model repo): checkpoints/, optimizer.bin"]
    assert "me/dbsam-tiny (private model repo)" in out and "| Liver | CT | 3D | 3 | 90.00 | 80.00 |" in out
    assert "Protocol: paper: 256x256 grid, unit spacing, NSD tolerance 1 px." in out
    assert 'DBSamModel.from_pretrained("me/dbsam-tiny")' in out and "epochs: 12" in out


def test_trained_card_metadata_parses_back(converted, tmp_path):
    folder = trained_folder(converted, tmp_path)
    args = push_to_hub.build_parser().parse_args([str(folder), "--repo-id", "me/dbsam-tiny"])
    plan = push_to_hub.plan_upload(args)
    plan.card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == "facebook/sam-vit-base" and data.model_name == "dbsam-tiny"  # training's `model`
    scores = {
        (r.dataset_name, r.metric_type): (r.metric_value, r.dataset_config, r.metric_config) for r in data.eval_results
    }
    assert scores == {
        ("Liver", "dice"): (90.0, "3D", "paper"),
        ("Liver", "nsd"): (80.0, "3D", "paper"),
        ("Lungs", "dice"): (95.0, "2D", "paper"),
    }
    flagged = push_to_hub.build_parser().parse_args([str(folder), "--repo-id", "me/x", "--base-model", "me/medsam"])
    assert push_to_hub.plan_upload(flagged).card.data.base_model == "me/medsam"


def test_upload_commits_exactly_the_planned_files(converted, tmp_path, capsys, monkeypatch):
    calls = {}

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def create_commit(self, repo_id, operations, **kwargs):
            calls["create_commit"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
            return type("Commit", (), {"commit_url": "https://huggingface.co/me/dbsam-tiny/commit/1"})()

    monkeypatch.setattr(push_to_hub, "HfApi", RecordingApi)
    folder = trained_folder(converted, tmp_path)
    assert push_to_hub.main([str(folder), "--repo-id", "me/dbsam-tiny", "--private"]) == 0
    assert calls["create_repo"] == ("me/dbsam-tiny", {"private": True, "repo_type": "model", "exist_ok": True})
    committed = calls["create_commit"]
    assert sorted(committed) == sorted(re.findall(r"^  (\S+)  \(", capsys.readouterr().out, re.M))
    assert committed["model.safetensors.index.json"] == str(folder / "model.safetensors.index.json")
    assert b"| Liver | CT | 3D | 3 | 90.00 | 80.00 |" in committed["README.md"]
    assert "90.00" not in (folder / "README.md").read_text()  # the user's folder is left as it was


@pytest.mark.parametrize("damage", ["no-processor-config", "missing-adapter-weights", "sam-folder"])
def test_push_refuses_unpublishable_folders(converted, tmp_path, capsys, no_network, damage):
    folder = tmp_path / "folder"
    shutil.copytree(converted.folder, folder)
    if damage == "no-processor-config":
        (folder / "processor_config.json").unlink()
        expected = "no processor_config.json or preprocessor_config.json"
    elif damage == "missing-adapter-weights":
        model = DBSamModel.from_pretrained(converted.folder)
        shutil.rmtree(folder)
        partial_weights = {k: v for k, v in model.state_dict().items() if ".fusion." not in k}
        model.save_pretrained(folder, state_dict=partial_weights)
        shutil.copy(converted.folder / "processor_config.json", folder)
        expected = "the weights do not match the config"
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "sam"}))
        expected = "model_type 'sam', not 'dbsam'"
    assert push_to_hub.main([str(folder), "--repo-id", "me/x", "--dry-run"]) == 2
    assert expected in capsys.readouterr().err


def test_results_reader_is_tolerant_of_layout_but_not_of_units(tmp_path):
    path = tmp_path / "results.json"
    brief_layout = {
        "model": "m",
        "protocol": "paper",
        "tasks": {"CT Liver": {"dimension": "3D", "dsc": 0.9, "nsd": 0.8}},
    }
    path.write_text(json.dumps(brief_layout))
    results = dbsam_card.read_results(path)
    assert (results.model, results.protocol, results.tasks[0].name, results.tasks[0].nsd) == (
        "m",
        {"name": "paper"},
        "CT Liver",
        0.8,
    )
    path.write_text(
        json.dumps(
            {"tasks": [{"task": "Polyp", "Dice": 0.5, "NSD": {"mean": 0.25}}, {"name": "Gland", "dsc": float("nan")}]}
        )
    )
    results = dbsam_card.read_results(path)
    assert [(t.name, t.dsc, t.nsd, t.dimension) for t in results.tasks] == [
        ("Polyp", 0.5, 0.25, None),
        ("Gland", None, None, None),
    ]
    assert results.averages == {} and results.protocol == {}
    path.write_text(json.dumps({"tasks": {"CT Liver": {"dsc": 91.2}}}))
    with pytest.raises(ValueError, match="task 'CT Liver': dsc = 91.2 is not a fraction"):
        dbsam_card.read_results(path)


def test_adapter_flags_become_dbsam_config_fields():
    parser = convert_sam_to_dbsam.build_parser()
    argv = ["--checkpoint", "x.pth", "--output-dir", "out", "--no-conv-branch", "--adapter-init", "identity"]
    argv += ["--adapter-option", "bca_ffn_ratio=2", "--adapter-option", "stage_end_indexes=[0,2]"]
    options = convert_sam_to_dbsam.adapter_options(parser.parse_args(argv))
    assert options == {
        "adapter_init": "identity",
        "use_conv_branch": False,
        "use_fusion": False,
        "bca_ffn_ratio": 2,
        "stage_end_indexes": [0, 2],
    }
    with pytest.raises(ValueError, match="'image_size': not a DB-SAM adapter setting"):
        convert_sam_to_dbsam.adapter_options(parser.parse_args([*argv, "--adapter-option", "image_size=3"]))


def test_release_file_names_give_the_base_model_only_when_the_width_agrees():
    vit_b = convert.infer_sam_config(meta_sam(768, 12, 12, (2, 5, 8, 11), 1024, 16, 14, 3, device="meta").state_dict())
    assert convert_sam_to_dbsam.known_base_model(Path("dl/medsam_vit_b.pth"), vit_b) == "wanglab/medsam-vit-base"
    assert convert_sam_to_dbsam.known_base_model(Path("sam_vit_h_4b8939.pth"), vit_b) is None
    assert convert_sam_to_dbsam.known_base_model(Path("my_finetune.pth"), vit_b) is None


def test_a_killed_conversions_staging_folder_is_removed_by_the_next_run(tmp_path, capsys):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\nfrom modeling_dbsam.io import staging_folder\n"
         f"work = staging_folder({str(out)!r})\n(work / 'model.safetensors').write_bytes(b'x' * 1000)\n"
         "os.kill(os.getpid(), signal.SIGKILL)"],
        capture_output=True,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").exists()
    unknown = tmp_path / ".out.partial-abc123"  # an older run's name: its state cannot be told
    unknown.mkdir()
    sam = meta_sam(**SMALL_B_LAYOUT)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    code, _, stderr = run_converter(
        capsys, "--checkpoint", tmp_path / "sam.pth", "--output-dir", out, "--decoder-num-heads", DECODER_HEADS
    )
    assert code == 0, stderr
    assert not leftovers[0].exists() and f"removed {leftovers[0]}: left by a killed run" in stderr
    assert unknown.exists() and f"note: {unknown}: left beside {out} by another run" in stderr
