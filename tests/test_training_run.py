"""training/train.py end to end on the tiny model: learning, freezing, resuming, NaN stops, evaluation."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
import train
import transformers
from accelerate.state import AcceleratorState, GradientState
from arguments import ModelArguments, latest_checkpoint
from safetensors.torch import load_file
from train import build_model
from training_support import make_dataset, write_tiny_model_config
from transformers import TrainerState
from transformers.trainer_pt_utils import safe_globals

from modeling_dbsam import DBSamConfig, DBSamModel
from modeling_dbsam.data import SamBoxTransform
from modeling_dbsam.evaluation import PAPER, evaluate_model
from modeling_dbsam.losses import SegmentationLoss, bce_dice_loss
from modeling_dbsam.pixels import conv_input_size
from modeling_dbsam.processing import load_processor


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "arrow", num_train=8, num_test=4, num_validation=4)


pytestmark = pytest.mark.usefixtures("single_thread")


def run_training(argv: list[str]) -> int:
    """``train.main`` in this process, with Accelerate's process-wide singletons reset as a new process has them."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train.main(argv)


def base_args(tmp_path: Path, data_dir: Path, output: str, *extra: str) -> list[str]:
    model_config = tmp_path / "model.json"
    if not model_config.exists():
        write_tiny_model_config(model_config)
    return [
        *("--model_config", str(model_config), "--data", str(data_dir), "--output_dir", str(tmp_path / output)),
        *("--report_to", "none", "--disable_tqdm", "--eval_strategy", "no", "--logging_steps", "1"),
        *extra,
    ]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "model.safetensors")


def checkpoint_names(output: Path) -> list[str]:
    return sorted((p.name for p in output.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_killed_during_a_save_and_resumed_equals_an_uninterrupted_run_bitwise(tmp_path, data_dir, monkeypatch):
    # 8 examples, micro-batch 1, 2 micro-batches per step: 4 steps per epoch; dropout and drop path are on.
    common = ("--max_steps", "6", "--save_steps", "3", "--per_device_train_batch_size", "1")
    common += ("--gradient_accumulation_steps", "2")
    assert run_training(base_args(tmp_path, data_dir, "uninterrupted", *common)) == 0

    original_save = transformers.Trainer._save_rng_state
    saves = []

    def dies_during_second_save(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:  # checkpoint-6: the process dies after writing the weights and optimizer state
            raise KeyboardInterrupt
        return original_save(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", dies_during_second_save)
    killed = base_args(tmp_path, data_dir, "killed", *common)
    with pytest.raises(KeyboardInterrupt):
        run_training(killed)
    output = tmp_path / "killed"
    assert (output / "checkpoint-6" / "model.safetensors").is_file()  # weights written, the state not yet
    assert not (output / "checkpoint-6" / "trainer_state.json").exists()
    assert latest_checkpoint(output) == output / "checkpoint-3"  # mid-epoch: 6 of 8 micro-batches done
    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", original_save)

    # Every file the resume reads is safetensors or loads with weights_only=True (no pickled code runs).
    loads, torch_load = [], torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loads.append((Path(a[0]).name, k.get("weights_only"))) or torch_load(*a, **k)
    )
    assert run_training([*killed, "--resume_from_checkpoint", "latest"]) == 0
    assert sorted(loads) == [("optimizer.pt", True), ("rng_state.pth", True), ("scheduler.pt", True)]
    assert TrainerState.load_from_json(str(output / "checkpoint-6" / "trainer_state.json")).global_step == 6
    expected, resumed = final_weights(tmp_path / "uninterrupted"), final_weights(output)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    at_step_3 = load_file(output / "checkpoint-3" / "model.safetensors")
    assert not torch.equal(at_step_3["mask_decoder.iou_token.weight"], expected["mask_decoder.iou_token.weight"])
    with safe_globals():  # transformers' allow-list for the RNG states: NumPy arrays and dtypes, nothing callable
        torch_load(output / "checkpoint-3" / "rng_state.pth", weights_only=True)


def mean_loss(model: DBSamModel, processor, dataset: datasets.Dataset) -> float:
    batch = dataset.with_transform(SamBoxTransform(processor, max_shift=0, passthrough=()))[:]
    model.eval()
    with torch.no_grad():
        masks = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    return bce_dice_loss(masks.pred_masks[:, :, 0], batch["labels"]).loss.item()


def test_loss_falls_on_a_tiny_overfit_set_and_frozen_weights_stay_unchanged(tmp_path, data_dir):
    no_noise = ("--adapter_dropout", "0", "--adapter_drop_path_rate", "0", "--max_box_shift", "0")
    args = base_args(tmp_path, data_dir, "overfit", *no_noise, "--max_steps", "40", "--learning_rate", "1e-2")
    args += ["--per_device_train_batch_size", "4", "--save_strategy", "epoch", "--seed", "7"]
    assert run_training(args) == 0
    output = tmp_path / "overfit"

    torch.manual_seed(7)  # what train.py's set_seed(7) gives build_model: the run's initial weights
    initial = build_model(
        ModelArguments(model_config=str(tmp_path / "model.json"), adapter_dropout=0.0, adapter_drop_path_rate=0.0)
    )
    trained = DBSamModel.from_pretrained(output)  # the Hub-ready folder loads as it is
    processor = load_processor(output)
    train_split = datasets.load_from_disk(str(data_dir))["train"]
    before, after = mean_loss(initial, processor, train_split), mean_loss(trained, processor, train_split)
    assert after < 0.25 * before, (before, after)

    trainable = set(initial.trainable_parameter_names())
    trained_parameters = dict(trained.named_parameters())
    for name, parameter in initial.named_parameters():
        unchanged = torch.equal(parameter, trained_parameters[name])
        if name not in trainable:  # including SAM's multimask heads, which single-mask training never reaches
            assert unchanged, f"frozen {name} changed"
        else:
            assert not unchanged, f"trainable {name} did not move"
    assert any(name.startswith("vision_encoder.layers.") for name in set(trained_parameters) - trainable)
    assert (output / "training_config.yaml").is_file()


def test_the_model_trains_on_exactly_what_the_processor_makes(tmp_path, data_dir, monkeypatch):
    """Loader workers send uint8 pixels and the step normalises them: the model must see the processor's values,
    and the convolution branch its own I_conv, resized from the native image."""
    seen = []
    forward = DBSamModel.forward

    def recording_forward(self, pixel_values=None, **kwargs):
        conv = kwargs["conv_pixel_values"].detach().clone()
        seen.append((pixel_values.detach().clone(), kwargs["input_boxes"].detach().clone(), conv))
        return forward(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(DBSamModel, "forward", recording_forward)
    args = base_args(tmp_path, data_dir, "spy", "--max_steps", "2", "--max_box_shift", "0", "--save_strategy", "epoch")
    assert run_training([*args, "--per_device_train_batch_size", "4", "--dataloader_num_workers", "2"]) == 0
    train_split = datasets.load_from_disk(str(data_dir))["train"]
    conv_size = conv_input_size(DBSamConfig.from_pretrained(tmp_path / "spy"))
    transform = SamBoxTransform(load_processor(tmp_path / "spy"), max_shift=0, conv_size=conv_size)
    reference = train_split.with_transform(transform)[:]
    pixel_values = torch.cat([pixels for pixels, _, _ in seen])
    boxes = torch.cat([box for _, box, _ in seen])
    conv_pixel_values = torch.cat([conv for _, _, conv in seen])
    assert pixel_values.dtype == conv_pixel_values.dtype == torch.float32 and len(pixel_values) == len(train_split)
    for pixels, box, conv in zip(pixel_values, boxes, conv_pixel_values):
        matches = [i for i in range(len(train_split)) if torch.equal(reference["pixel_values"][i], pixels)]
        matches = [i for i in matches if torch.equal(reference["conv_pixel_values"][i], conv)]
        assert matches and any(torch.equal(reference["input_boxes"][i], box) for i in matches)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    calls = []

    def nan_at_fifth_batch(logits, targets):
        losses = bce_dice_loss(logits, targets)
        calls.append(1)
        return SegmentationLoss(losses.loss * float("nan"), losses.bce, losses.dice) if len(calls) == 5 else losses

    monkeypatch.setattr(train, "bce_dice_loss", nan_at_fifth_batch)
    args = base_args(tmp_path, data_dir, "nan", "--max_steps", "8", "--save_steps", "2")
    assert run_training([*args, "--per_device_train_batch_size", "2"]) == 1
    output = tmp_path / "nan"
    message = capsys.readouterr().err
    assert "loss is nan at step 5" in message and str(output / "checkpoint-4") in message
    assert checkpoint_names(output) == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(output / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "nan" / "model.safetensors").exists()  # no model is published from a failed run


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        TrainerState(global_step=step).save_to_json(str(tmp_path / f"checkpoint-{step}" / "trainer_state.json"))
    (tmp_path / "checkpoint-8").mkdir()  # a save killed before its trainer_state.json: not a checkpoint
    (tmp_path / "checkpoint-9").mkdir()  # killed while writing it: half a JSON file
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": 9, "log_hi')
    (tmp_path / "checkpoint-10.bak").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_evaluation_picks_the_best_checkpoint_and_publishes_its_scores(tmp_path, data_dir):
    args = base_args(tmp_path, data_dir, "evaluated", "--num_train_epochs", "3", "--per_device_train_batch_size", "4")
    args += ["--eval_strategy", "epoch", "--metric_for_best_model", "dsc", "--load_best_model_at_end"]
    args += ["--save_strategy", "epoch", "--save_total_limit", "1", "--learning_rate", "3e-3"]
    assert run_training(args) == 0
    output = tmp_path / "evaluated"
    state = TrainerState.load_from_json(str(latest_checkpoint(output) / "trainer_state.json"))
    evaluations = [entry for entry in state.log_history if "eval_dsc" in entry]
    assert [e["step"] for e in evaluations] == [2, 4, 6]
    scores = [e["eval_dsc"] for e in evaluations]
    best = evaluations[scores.index(max(scores))]
    assert state.best_model_checkpoint == str(output / f"checkpoint-{best['step']}") and state.best_metric == max(
        scores
    )
    assert Path(state.best_model_checkpoint).is_dir()  # kept by rotation despite the limit of 1

    published = train.json.loads((output / "eval_results.json").read_text())
    assert published["step"] == best["step"]
    assert {f"eval_{name}": value for name, value in published["metrics"].items()} == {
        name: value for name, value in best.items() if name.startswith("eval_")
    }
    card = (output / "README.md").read_text()
    assert f"Published weights: step {best['step']}" in card and f"| {max(scores):.4f} |" in card
    best_weights = load_file(Path(state.best_model_checkpoint) / "model.safetensors")
    saved = final_weights(output)
    assert all(torch.equal(saved[name], best_weights[name]) for name in best_weights)

    # The scores match `dbsam evaluate`'s own path on the published folder, on the validation split it selected by.
    validation = datasets.load_from_disk(str(data_dir))["validation"]
    results = evaluate_model(
        lambda: (DBSamModel.from_pretrained(output).eval(), load_processor(output)),
        validation,
        PAPER,
        tmp_path / "report",
        model_info={"name": "tiny", "path": str(output), "fingerprint": "x"},
        data_info={"path": str(data_dir), "split": "validation", "fingerprint": "y"},
    )
    assert results["averages"] == published["averages"]
    assert results["tasks"] == published["tasks"]


def test_gradient_layouts_differ_from_their_parameters_only_on_size_one_dimensions():
    """train.py silences DDP's "Grad strides do not match bucket view strides": harmless only while every such
    difference is the stride of a size-1 dimension (the depthwise kernels), which changes no memory layout."""
    from tiny import tiny_sam_config_dict

    from modeling_dbsam import DBSamConfig

    model = DBSamModel(DBSamConfig(**tiny_sam_config_dict()))
    model.freeze_for_training()
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_boxes": torch.tensor([[[2.0, 3, 20, 25]]] * 2)}
    model.train()(**inputs, multimask_output=False).pred_masks.sum().backward()
    differing = {
        name: [d for d, (a, b) in enumerate(zip(p.stride(), p.grad.stride())) if a != b]
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.stride() != p.stride()
    }
    assert differing, "the warning's cause is gone: remove the filter in train.setup_logging"
    for name, dimensions in differing.items():
        shape = dict(model.named_parameters())[name].shape
        assert all(shape[d] == 1 for d in dimensions), (name, shape, dimensions)
