"""Two CPU processes (gloo, launched by ``accelerate launch`` with the shipped DDP config, as a user would): DDP keeps both ranks' weights identical, and a
run SIGKILLed after a checkpoint and resumed with ``--resume_from_checkpoint latest`` ends bitwise where the same
run left alone ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from training_support import ROOT, TRAINING_DIR, make_dataset, write_tiny_model_config
from transformers import TrainerState

# train.main in each process, with a callback that writes the rank's final parameters beside the run's output and,
# when KILL_AFTER_STEP is set, SIGKILLs rank 0 right after that step's checkpoint is complete.
LAUNCHED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    sys.path.insert(0, {training!r})
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    import train

    class DumpAndKill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ.get("KILL_AFTER_STEP", "0")) and args.process_index == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            parameters = {{name: p.detach().contiguous() for name, p in model.named_parameters()}}
            save_file(parameters, str(Path(args.output_dir) / f"rank-{{args.process_index}}-of-{{args.world_size}}.safetensors"))

    build = train.build_trainer
    def build_with_callback(config):
        trainer = build(config)
        trainer.add_callback(DumpAndKill())
        return trainer
    train.build_trainer = build_with_callback
    sys.exit(train.main(sys.argv[1:]))
    """
)


def launch(tmp_path, arguments: list[str], kill_after_step: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED.format(training=str(TRAINING_DIR)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    command += ["--config_file", str(TRAINING_DIR / "accelerate" / "ddp.yaml")]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "KILL_AFTER_STEP": str(kill_after_step),
    }
    return subprocess.run(
        [*command, str(script), *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )


def test_two_processes_agree_share_the_data_and_resume_bitwise_after_sigkill(tmp_path):
    data = make_dataset(tmp_path / "arrow", num_train=8, num_test=4, num_validation=4)
    model_config = write_tiny_model_config(tmp_path / "model.json")
    common = ["--use_cpu", "--model_config", str(model_config), "--data", str(data), "--num_train_epochs", "2"]
    common += ["--per_device_train_batch_size", "1", "--eval_strategy", "epoch", "--save_steps", "3"]
    common += ["--report_to", "none", "--disable_tqdm", "--logging_steps", "1"]
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    result = launch(tmp_path, [*common, "--output_dir", str(alone)])
    assert result.returncode == 0, result.stderr[-4000:]

    rank0 = load_file(alone / "rank-0-of-2.safetensors")
    rank1 = load_file(alone / "rank-1-of-2.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    published = load_file(alone / "model.safetensors")
    assert all(torch.equal(rank0[name], published[name]) for name in rank0 if name in published)

    # 8 examples over 2 processes x 1 per micro-batch: 4 optimizer steps per epoch, not 8.
    state = TrainerState.load_from_json(str(alone / "checkpoint-8" / "trainer_state.json"))
    assert state.global_step == 8 and [e["step"] for e in state.log_history if "eval_dsc" in e] == [4]
    assert sorted(p.name for p in (alone / "evaluations").iterdir()) == ["step-4", "step-8"]  # after each epoch
    # Both processes scored a share of the validation cases (2 cases of 2 slices), and the shares were combined.
    shares = [(alone / "evaluations" / "step-4" / f"cases-{rank}.jsonl").read_text().splitlines() for rank in (0, 1)]
    assert sorted(json.loads(line)["case_id"] for share in shares for line in share) == [
        "validation-case-0",
        "validation-case-1",
    ]

    # SIGKILL after the mid-epoch checkpoint of step 3; the resumed run ends bitwise where the one left alone did.
    result = launch(tmp_path, [*common, "--output_dir", str(killed)], kill_after_step=3)
    assert result.returncode != 0 and "SIGKILL" in result.stderr
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3"]
    result = launch(tmp_path, [*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = load_file(killed / "model.safetensors")
    assert resumed.keys() == published.keys()
    assert all(torch.equal(resumed[name], published[name]) for name in published)
