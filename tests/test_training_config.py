"""The training configuration: YAML + command line into typed dataclasses, every mistake caught before work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from arguments import CONFIG_FILE_NAME, ConfigError, parse_config
from tiny import tiny_sam_config_dict
from training_support import TRAINING_DIR, make_dataset, write_tiny_model_config
from transformers import TrainerState


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny-arrow", num_train=2, num_test=2, num_validation=2)


@pytest.fixture
def base(tmp_path, data_dir) -> dict:
    model_config = write_tiny_model_config(tmp_path / "model.json")
    return {"model_config": str(model_config), "data": str(data_dir), "output_dir": str(tmp_path / "out")}


def write_yaml(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def checked(tmp_path: Path, values: dict):
    """What train.py checks before it loads a model: the configuration, then the data it names."""
    from train import training_and_eval_sets

    config = parse_config(["--config", write_yaml(tmp_path, values)])
    training_and_eval_sets(config)
    return config


def test_yaml_values_are_typed_and_the_command_line_overrides_them(tmp_path, base):
    path = write_yaml(tmp_path, {**base, "learning_rate": "3e-4", "max_steps": 7, "bf16": True, "use_fusion": False})
    config = parse_config(["--config", path, "--max_steps", "9", "--seed", "5", "--bf16", "false"])
    assert config.training.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert isinstance(config.training.learning_rate, float)
    assert (config.training.max_steps, config.training.seed, config.training.bf16) == (9, 5, False)
    assert config.model.config_overrides() == {"use_fusion": False}
    variant = parse_config(
        ["--config", path, "--adapter_variant", "authors", "--bf16", "false"]
    ).model.config_overrides()
    assert variant == {"adapter_variant": "authors", "use_fusion": False}
    assert config.data.max_box_shift == 20  # the paper's default where neither sets it
    # transformers' own options and the project's recipe defaults, in one TrainingArguments
    assert config.training.lr_scheduler_type == "polynomial" and config.training.optim == "adamw_torch_fused"
    assert config.training.lr_scheduler_kwargs == {"lr_end": 0.0, "power": 1.0}
    # YAML shapes the command line spells differently: a mapping (JSON), null, a list of trackers
    extra = {"lr_scheduler_kwargs": {"lr_end": 1e-6, "power": 2.0}, "save_total_limit": None, "report_to": ["none"]}
    config = parse_config(["--config", write_yaml(tmp_path, {**base, **extra})])
    assert config.training.lr_scheduler_kwargs == {"lr_end": 1e-6, "power": 2.0}
    assert config.training.save_total_limit is None and config.training.report_to == []


def test_paper_recipe_matches_the_paper(tmp_path, train_test_dir):
    values = yaml.safe_load((TRAINING_DIR / "configs" / "paper.yaml").read_text())
    assert values["learning_rate"] == pytest.approx(1e-4) and values["weight_decay"] == pytest.approx(0.01)
    assert values["num_train_epochs"] == 12 and values["max_box_shift"] == 20 and values["horizontal_flip"] == 0
    assert values["adapter_dropout"] == values["adapter_drop_path_rate"] == pytest.approx(0.4)
    assert values["bf16"] or values.get("fp16")
    # Model selection on a validation split carved from train by case; the test split is left to dbsam evaluate.
    assert values["eval_split"] == "validation" and values["validation_fraction"] > 0
    assert values["metric_for_best_model"] == "dsc" and values["eval_strategy"] != "no"
    config = parse_config(
        ["--config", str(TRAINING_DIR / "configs" / "paper.yaml"), "--data", str(train_test_dir)]
        + ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]  # bf16 on a GPU, or on CPU when told
    )
    assert config.model.model == "facebook/sam-vit-base"


def test_quickstart_selects_on_the_validation_split():
    values = yaml.safe_load((TRAINING_DIR / "configs" / "quickstart.yaml").read_text())
    assert values["eval_split"] == "validation" and values["metric_for_best_model"] == "dsc"
    assert values["eval_strategy"] != "no"


@pytest.fixture(scope="module")
def train_test_dir(tmp_path_factory) -> Path:
    """MedSAM's layout: train and test only (4 cases of 2 slices in train)."""
    return make_dataset(tmp_path_factory.mktemp("data") / "train-test", num_train=8, num_test=2)


def test_validation_is_carved_from_train_by_case_with_the_seeded_split(tmp_path, base, train_test_dir):
    import datasets
    from train import training_and_eval_sets

    from modeling_dbsam.data.pairing import RawCase
    from modeling_dbsam.data.splits import assign_splits

    values = {**base, "data": str(train_test_dir), "validation_fraction": 0.5, "validation_seed": 3}
    config = parse_config(["--config", write_yaml(tmp_path, values)])
    train_set, eval_set = training_and_eval_sets(config)
    full = datasets.load_from_disk(str(train_test_dir))["train"]
    cases = sorted({f"{t}/{c}" for t, c in zip(full["task"], full["case_id"])})
    expected = assign_splits([RawCase(c, "", "") for c in cases], (0.5, 0.5, 0.0), seed=3)["validation"]
    assert sorted(set(eval_set["case_id"])) == sorted(c.case_id.split("/")[1] for c in expected)
    assert not set(eval_set["case_id"]) & set(train_set["case_id"])  # no case on both sides
    assert len(train_set) + len(eval_set) == len(full) == 8 and len(eval_set) == 4
    assert "test-case-0" not in set(eval_set["case_id"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eval_split": "test"}, "must not read the test split"),
        ({"validation_fraction": 0.5}, "has its own validation split"),
        ({"validation_fraction": 1.0}, "validation_fraction must be in [0, 1)"),
        ({"validation_fraction": 0.5, "eval_split": "train"}, "set eval_split: validation"),
    ],
)
def test_model_selection_never_reads_the_test_split(tmp_path, base, change, message):
    with pytest.raises(ConfigError) as error:
        checked(tmp_path, {**base, **change})
    assert message in str(error.value)


def test_without_a_validation_split_the_error_says_how_to_carve_one(tmp_path, base, train_test_dir):
    with pytest.raises(ConfigError, match="set validation_fraction"):
        checked(tmp_path, {**base, "data": str(train_test_dir)})
    values = {**base, "data": str(train_test_dir), "eval_strategy": "no"}
    assert checked(tmp_path, values).data.validation_fraction == 0


def test_sync_batch_norm_defaults_on_for_several_gpu_processes_only():
    from train import wants_sync_batch_norm

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [wants_sync_batch_norm(None, n, cuda) for n in (1, 2)] == [False, True]
    assert wants_sync_batch_norm(None, 2, cpu) is False  # PyTorch's SyncBatchNorm has no CPU kernel
    assert wants_sync_batch_norm(False, 4, cuda) is False and wants_sync_batch_norm(True, 1, cuda) is True
    with pytest.raises(ValueError, match="SyncBatchNorm needs GPU processes"):
        wants_sync_batch_norm(True, 2, cpu)


def test_conv_branch_batch_norm_becomes_sync_batch_norm_with_the_same_state():
    """train.py converts the whole model: its only BatchNorm layers are the conv branch's."""
    from modeling_dbsam import DBSamConfig, DBSamModel

    torch.manual_seed(0)
    model = DBSamModel(DBSamConfig(**tiny_sam_config_dict(), adapter_variant="authors")).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.get_image_embeddings(pixels)
    assert torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) is model
    kinds = [type(m) for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert kinds == [torch.nn.SyncBatchNorm] * 4
    assert model.vision_encoder.conv_branch.layers[1].momentum == 0.01  # the variant's momentum is kept
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.get_image_embeddings(pixels), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rat": 1e-4}, "unknown option 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"max_steps": "ten"}, "max_steps: invalid int value: 'ten'"),
        ({"max_steps": 7.5}, "max_steps: invalid int value: '7.5'"),
        ({"bf16": "maybe"}, "bf16: Truthy value expected: got maybe"),
        (
            {"eval_strategy": "sometimes"},
            "eval_strategy: invalid choice: 'sometimes' (choose from 'no', 'steps', 'epoch')",
        ),
        ({"data": "/no/such/folder"}, "data /no/such/folder: no such dataset folder"),
        ({"data": None}, "data is required"),
        ({"train_split": "training"}, "train_split 'training' not in"),
        ({"model": "facebook/sam-vit-base"}, "exactly one of model and model_config"),
        ({"bf16": True, "fp16": True, "use_cpu": True}, "At most one of fp16 and bf16 can be True"),
        ({"save_steps": 0}, "save_steps 0 never saves: use save_strategy epoch"),
        ({"eval_strategy": "no", "metric_for_best_model": "dsc"}, "metric_for_best_model needs evaluation"),
        ({"resume_from_checkpoint": "latest"}, "resume_from_checkpoint latest: no complete checkpoint in"),
        ({"report_to": "tensorbored"}, "report_to 'tensorbored' is not a tracker"),
        ({"optim": "adamw_typo"}, "optim: invalid choice: 'adamw_typo' (choose from 'adamw_torch', "),
        ({"report_to": "aim"}, "report_to 'aim' is not a tracker"),
        ({"report_to": "comet_ml"}, "report_to 'comet_ml': its package is not installed"),
        ({"deepspeed": "ds_config.json"}, "DeepSpeed was requested but is not installed"),
        ({"fp16": True}, "fp16 needs a CUDA GPU"),
        ({"horizontal_flip": 2}, "horizontal_flip must be in [0, 1], got 2"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, base, change, message):
    with pytest.raises(ConfigError) as error:
        checked(tmp_path, {**base, **change})
    assert message in str(error.value)


def test_a_data_folder_that_is_not_a_dataset_dict_is_one_clear_error(tmp_path, base):
    import datasets

    datasets.Dataset.from_dict({"image": [0]}).save_to_disk(str(tmp_path / "single"))
    (tmp_path / "empty").mkdir()
    for folder, message in (("single", "holds a single Dataset"), ("empty", "not a folder written by save_to_disk")):
        with pytest.raises(ConfigError, match=f"^data {tmp_path / folder}: {message}"):
            checked(tmp_path, {**base, "data": str(tmp_path / folder)})


def test_fsdp_on_a_machine_without_gpus_is_refused_before_any_work(tmp_path, base, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.raises(ConfigError, match="FSDP was requested but needs CUDA GPUs"):
        parse_config(["--config", write_yaml(tmp_path, base)])


def test_a_wrong_command_line_type_or_unknown_option_is_one_config_error(tmp_path, base):
    path = write_yaml(tmp_path, base)
    with pytest.raises(ConfigError, match="max_steps: invalid int value: 'ten'"):
        parse_config(["--config", path, "--max_steps", "ten"])
    with pytest.raises(ConfigError, match=r"unknown option 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_config(["--config", path, "--learning_rat", "1e-3"])  # no abbreviations: a typo is not a prefix
    with pytest.raises(ConfigError, match=r"command line: unknown option 'bogus'"):
        parse_config(["--config", path, "--bogus", "1"])
    with pytest.raises(
        ConfigError, match=r"unknown option 'lr_schedular_type' \(did you mean 'lr_scheduler_type'\?\)"
    ):
        parse_config(["--config", path, "--lr_schedular_type", "cosine"])
    # the same message from the YAML file, naming it (the file is parsed like the command line)
    with pytest.raises(ConfigError, match=rf"^{path}: max_steps: invalid int value: 'ten'$"):
        parse_config(["--config", write_yaml(tmp_path, {**base, "max_steps": "ten"})])


def test_train_py_reports_config_errors_in_one_line_before_any_work(tmp_path, base, capsys, monkeypatch):
    import train

    monkeypatch.setattr(train, "build_model", lambda *args: pytest.fail("a model was loaded"))
    path = write_yaml(tmp_path, {**base, "max_steps": "ten"})
    assert train.main(["--config", path]) == 2
    assert capsys.readouterr().err == f"train.py: error: {path}: max_steps: invalid int value: 'ten'\n"
    # Found only once the eval split is read (it holds 3D tasks alone), still before a model or output_dir.
    path = write_yaml(tmp_path, {**base, "metric_for_best_model": "dsc_2d", "report_to": "none"})
    assert train.main(["--config", path]) == 2
    assert "metric_for_best_model 'dsc_2d' cannot be computed on eval_split 'validation'" in capsys.readouterr().err
    path = write_yaml(tmp_path, {**base, "metric_for_best_model": "dice", "report_to": "none"})
    assert train.main(["--config", path]) == 2
    error = capsys.readouterr().err
    assert "metric_for_best_model 'dice' cannot be computed on eval_split 'validation'; it yields dsc, dsc/" in error
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused_unless_resumed_with_the_same_config_or_overwritten(tmp_path, base):
    output = Path(base["output_dir"])
    output.mkdir()
    (output / "notes.txt").write_text("a user's file")
    path = write_yaml(tmp_path, base)
    with pytest.raises(ConfigError, match="already holds files"):
        parse_config(["--config", path])
    assert parse_config(["--config", path, "--overwrite_output_dir"]).training.overwrite_output_dir

    # A run of this configuration with a checkpoint: resumable, but only with the same settings.
    parse_config(["--config", path, "--overwrite_output_dir"]).save(output / CONFIG_FILE_NAME)
    checkpoint = output / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    TrainerState(global_step=3).save_to_json(str(checkpoint / "trainer_state.json"))
    with pytest.raises(ConfigError, match="resume_from_checkpoint latest to continue"):
        parse_config(["--config", path])
    config = parse_config(["--config", path, "--resume_from_checkpoint", "latest", "--logging_steps", "1"])
    assert config.training.resume_from_checkpoint == "latest"
    with pytest.raises(ConfigError, match=r"learning_rate: 0.0001 -> 0.001"):
        parse_config(["--config", path, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"])
    # The checkpoint of another run (an explicit folder) is checked against that run's configuration.
    other = Path(base["output_dir"] + "-other")
    with pytest.raises(ConfigError, match=r"belongs to a run with a different configuration \(seed: 42 -> 5"):
        parse_config(
            ["--config", path, "--output_dir", str(other), "--resume_from_checkpoint", str(checkpoint), "--seed", "5"]
        )
    with pytest.raises(ConfigError, match="contradict"):
        parse_config(["--config", path, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"])


def test_resume_from_an_explicit_folder_must_be_a_checkpoint(tmp_path, base):
    path = write_yaml(tmp_path, base)
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        parse_config(["--config", path, "--resume_from_checkpoint", str(tmp_path)])
    half = tmp_path / "checkpoint-5"  # killed while Trainer wrote its state
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 5, "log_hi')
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        parse_config(["--config", path, "--resume_from_checkpoint", str(half)])


def test_a_processor_that_does_not_fit_the_model_is_refused(tmp_path):
    from arguments import ModelArguments
    from train import build_processor
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from modeling_dbsam import DBSamConfig

    config = DBSamConfig(**tiny_sam_config_dict())  # 32 px
    SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64})).save_pretrained(tmp_path / "proc")
    with pytest.raises(ValueError, match="resizes images to 64 px but the model takes 32 px"):
        build_processor(ModelArguments(model_config="x.json", processor=str(tmp_path / "proc")), config)
    fitted = build_processor(ModelArguments(model_config="x.json"), config)  # derived from the config
    assert fitted.image_processor.size["longest_edge"] == 32 and fitted.image_processor.mask_size["longest_edge"] == 64


def test_a_model_from_random_weights_gets_metas_initialisation_and_adapters_keep_theirs(tmp_path):
    """transformers' SAM init (std 1e-10 in the ViT) gives mask logits near 1e-6 that barely train; Meta's
    (PyTorch's default layer init, N(0, 1) position frequencies) gives O(1) logits. Adapter init is untouched."""
    import torch
    from arguments import ModelArguments
    from train import build_model

    from modeling_dbsam import DBSamConfig, DBSamModel

    torch.manual_seed(0)
    model = build_model(ModelArguments(model_config=str(write_tiny_model_config(tmp_path / "model.json"))))
    torch.manual_seed(0)
    stock = DBSamModel(DBSamConfig(**tiny_sam_config_dict()))
    qkv = model.vision_encoder.layers[0].attn.qkv.weight
    bound = qkv.shape[1] ** -0.5  # kaiming_uniform(a=sqrt(5)) as nn.Linear.reset_parameters draws it
    assert qkv.abs().max() <= bound and qkv.std() > 0.4 * bound
    assert stock.vision_encoder.layers[0].attn.qkv.weight.abs().max() < 1e-8
    assert 0.7 < model.shared_image_embedding.positional_embedding.std() < 1.4
    assert model.mask_decoder.mask_tokens.weight.std() > 0.5  # nn.Embedding's N(0, 1)
    built, adapter_names = dict(model.named_parameters()), set(stock.adapter_parameter_names())
    for name, parameter in stock.named_parameters():
        if name in adapter_names:
            assert torch.equal(built[name], parameter), name
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_boxes": torch.tensor([[[2.0, 3, 20, 25]]] * 2)}
    with torch.no_grad():
        logits = model.eval()(**inputs, multimask_output=False).pred_masks
        stock_logits = stock.eval()(**inputs, multimask_output=False).pred_masks
    assert logits.std() > 1e-2 and stock_logits.std() < 1e-4
