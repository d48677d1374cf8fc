"""Training checkpoints: written atomically, found by step, rotated.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, scaler, RNG states) plus
``trainer_state.json`` (step, epoch, evaluations, best checkpoint). It is written into a hidden
temporary sibling (``.tmp-checkpoint-N``) and renamed to ``checkpoint-N`` only when complete, so a
run killed while saving leaves the previous checkpoints intact and ``latest`` never picks a
partial one. The output folder must be on a file system all processes share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """What the loop needs, besides Accelerate's state, to continue where a checkpoint left off."""

    global_step: int = 0
    epoch: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # {"step": ..., "metrics": {...}}
    best_metric: float | None = None
    best_checkpoint: str | None = None  # folder name inside the checkpoints folder

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        path = folder / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: not a training checkpoint (no {STATE_FILE})")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def checkpoint_step(folder: Path) -> int | None:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first; temporary folders of interrupted saves are never listed."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(resume_from_checkpoint: str, root: Path) -> Path:
    """``latest`` (the newest complete checkpoint in ``root``) or an explicit checkpoint folder."""
    if resume_from_checkpoint == "latest":
        latest = latest_checkpoint(root)
        if latest is None:
            raise FileNotFoundError(f"resume_from_checkpoint latest: no complete checkpoint in {root}")
        return latest
    folder = Path(resume_from_checkpoint)
    TrainerState.load(folder)  # raises if it is not a checkpoint
    return folder


def remove_interrupted_saves(root: Path) -> list[Path]:
    """Delete temporary folders that a killed run left behind; return them."""
    leftovers = sorted(root.glob(f"{TEMP_PREFIX}*")) if root.is_dir() else []
    for folder in leftovers:
        shutil.rmtree(folder)
    return leftovers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Accelerator, root: Path, state: TrainerState) -> Path:
    """Save the full training state for ``state.global_step`` atomically (all processes call this)."""
    final = root / f"{PREFIX}{state.global_step}"
    temporary = root / f"{TEMP_PREFIX}{state.global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(temporary)
        if final.exists():  # an older run's checkpoint of the same step (after overwrite_output_dir)
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(root: Path, limit: int | None, keep: str | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``, never the one named ``keep`` (the best); return them."""
    if limit is None:
        return []
    checkpoints = list_checkpoints(root)
    removable = [p for p in checkpoints[:-limit] if p.name != keep] if len(checkpoints) > limit else []
    for folder in removable:
        shutil.rmtree(folder)
    return removable
