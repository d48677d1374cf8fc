"""Trainer options the project does not implement itself (auto_find_batch_size, torch_compile, push_to_hub),
run through training/train.py on the tiny model: each must work together with the project's overrides
(seeded sampler and dropout, staged checkpoints, the published folder)."""

from __future__ import annotations

from concurrent.futures import Future
from fnmatch import fnmatch  # as huggingface_hub matches ignore_patterns
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import train
import transformers
from test_training_run import base_args, final_weights, run_training
from training_support import make_dataset

from modeling_dbsam import DBSamModel
from modeling_dbsam.processing import load_processor

pytestmark = pytest.mark.usefixtures("single_thread")
SHORT_RUN = ("--max_steps", "4", "--save_strategy", "no", "--learning_rate", "1e-3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "arrow", num_train=8, num_test=4, num_validation=4)


def test_auto_find_batch_size_retries_an_out_of_memory_step_as_the_smaller_batch_would_run(
    tmp_path, data_dir, monkeypatch
):
    # Accelerate's find_executable_batch_size retries with 90 % of the batch: 4 -> 3
    assert (
        run_training(base_args(tmp_path, data_dir, "batch-3", *SHORT_RUN, "--per_device_train_batch_size", "3")) == 0
    )

    compute_loss = train.DBSamTrainer.compute_loss

    def out_of_memory_above_batch_3(self, model, inputs, *args, **kwargs):
        if inputs["pixel_values"].shape[0] > 3:  # what PyTorch's CPU allocator raises when memory runs out
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 GB.")
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(train.DBSamTrainer, "compute_loss", out_of_memory_above_batch_3)
    argv = base_args(tmp_path, data_dir, "auto", *SHORT_RUN, "--per_device_train_batch_size", "4")
    assert run_training([*argv, "--auto_find_batch_size"]) == 0
    expected, found = final_weights(tmp_path / "batch-3"), final_weights(tmp_path / "auto")
    assert all(torch.equal(expected[name], found[name]) for name in expected)


def test_torch_compile_trains_the_same_model_and_publishes_plain_weights(tmp_path, data_dir):
    """Dynamo's "eager" backend: the Trainer + DBSamTrainer + compiled-model path in seconds. The default backend
    (inductor) compiles the tiny model's training step in minutes on 2 cores (docs/training.md)."""
    assert run_training(base_args(tmp_path, data_dir, "eager", *SHORT_RUN)) == 0
    compiled = base_args(tmp_path, data_dir, "compiled", *SHORT_RUN, "--torch_compile")
    assert run_training([*compiled, "--torch_compile_backend", "eager"]) == 0
    expected, found = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert found.keys() == expected.keys()  # no "_orig_mod." prefixes: the folder loads as a plain DBSamModel
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    DBSamModel.from_pretrained(tmp_path / "compiled")


class FakeHub:
    """A Hub that records what each upload would send: the names of the files, and the card at that moment."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), path_in_repo=None, **kwargs):
        relative = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        files = sorted(
            name for name in relative if not any(fnmatch(name, pattern) for pattern in ignore_patterns or ())
        )
        card = Path(folder_path, "README.md")
        self.uploads.append(
            {
                "repo": repo_id,
                "folder": Path(folder_path),
                "files": files,
                "card": card.read_text() if card.is_file() else "",
            }
        )
        done = Future()
        done.set_result(None)
        return done


def test_push_to_hub_sends_the_published_folder_and_only_complete_checkpoints(tmp_path, data_dir, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    argv = base_args(tmp_path, data_dir, "pushed", "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2")
    argv += [
        "--eval_strategy",
        "steps",
        "--push_to_hub",
        "--hub_model_id",
        "dbsam-test",
        "--hub_strategy",
        "checkpoint",
    ]
    assert run_training(argv) == 0
    assert hub.repos == ["dbsam-test"]
    assert all(upload["repo"] == "user/dbsam-test" for upload in hub.uploads)
    checkpoints = [u for u in hub.uploads if u["folder"].name.startswith("checkpoint-")]
    assert [u["folder"].name for u in checkpoints] == ["checkpoint-2", "checkpoint-4"]  # complete ones
    assert all("trainer_state.json" in u["files"] and "model.safetensors" in u["files"] for u in checkpoints)
    final = hub.uploads[-1]
    assert final["folder"] == tmp_path / "pushed"
    for name in ("model.safetensors", "config.json", "processor_config.json", "eval_results.json", "README.md"):
        assert name in final["files"], name
    assert not any(name.startswith("checkpoint-") for name in final["files"])
    assert "## Training and validation results" in final["card"]
    load_processor(tmp_path / "pushed")


def test_every_intermediate_push_is_a_loadable_model_folder(tmp_path, data_dir, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    argv = base_args(tmp_path, data_dir, "pushed", "--max_steps", "4", "--save_steps", "2")
    assert run_training([*argv, "--push_to_hub", "--hub_model_id", "dbsam-test", "--hub_strategy", "every_save"]) == 0
    model_pushes = [u for u in hub.uploads if u["folder"] == tmp_path / "pushed"]
    assert len(model_pushes) == 3  # after checkpoint-2, after checkpoint-4, and the published folder
    for upload in model_pushes:  # what a user pulling the repo mid-training gets must load with its processor
        assert {"model.safetensors", "config.json", "processor_config.json"} <= set(upload["files"]), upload["files"]
