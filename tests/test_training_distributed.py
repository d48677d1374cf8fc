"""Two CPU processes (gloo, launched by torchrun as a user would): DDP keeps both ranks' weights identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from checkpointing import TrainerState
from safetensors.torch import load_file
from training_support import ROOT, TRAINING_DIR, make_dataset, write_tiny_model_config

# Runs train.py's Training in each process, then writes that rank's parameters beside the run's output.
RANK_DUMP = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, {training!r})
    from safetensors.torch import save_file

    import train
    from run_config import parse_config

    training = train.Training(parse_config(sys.argv[1:]))
    training.train()
    model = training.accelerator.unwrap_model(training.model)
    rank = training.accelerator.process_index
    save_file(
        {{name: p.detach().contiguous() for name, p in model.named_parameters()}},
        str(Path(training.args.output_dir) / f"rank-{{rank}}-of-{{training.accelerator.num_processes}}.safetensors"),
    )
    """
)


def test_two_processes_end_with_identical_weights_and_share_the_data(tmp_path):
    data = make_dataset(tmp_path / "arrow", num_train=8, num_test=4, num_validation=4)
    model_config = write_tiny_model_config(tmp_path / "model.json")
    script = tmp_path / "rank_dump.py"
    script.write_text(RANK_DUMP.format(training=str(TRAINING_DIR)))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(script), "--use_cpu", "--model_config", str(model_config), "--data", str(data)]
    command += ["--output_dir", str(output), "--num_train_epochs", "1", "--per_device_train_batch_size", "1"]
    command += ["--eval_strategy", "epoch", "--save_steps", "2", "--report_to", "none", "--disable_tqdm"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, encoding="utf-8", errors="replace", timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]

    rank0 = load_file(output / "rank-0-of-2.safetensors")
    rank1 = load_file(output / "rank-1-of-2.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    published = load_file(output / "model.safetensors")
    assert all(torch.equal(rank0[name], published[name]) for name in rank0 if name in published)

    # 8 examples over 2 processes x 1 per micro-batch: 4 optimizer steps in the epoch, not 8.
    state = TrainerState.load(output / "checkpoints" / "checkpoint-4")
    assert state.global_step == 4 and [e["step"] for e in state.evaluations] == [4]
    # Both processes scored a share of the validation cases (2 cases of 2 slices), and the shares were combined.
    shares = [(output / "evaluations" / "step-4" / f"cases-{rank}.jsonl").read_text().splitlines() for rank in (0, 1)]
    assert sorted(json.loads(line)["case_id"] for share in shares for line in share) == [
        "validation-case-0",
        "validation-case-1",
    ]
    assert sum(task["cases"] for task in state.evaluations[0]["tasks"]) == 2
