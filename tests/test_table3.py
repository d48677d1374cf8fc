"""The Table 3 experiment: "filling the box" scored by the evaluation code, and the command end to end on a few steps."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import _dataset, _ell, _example, _rect

from modeling_dbsam.evaluation import PAPER, aggregate, box_filling_cases
from modeling_dbsam.metrics import dice_score

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "scripts"))
import table3  # noqa: E402


def test_filling_the_box_scores_the_evaluation_box_as_the_prediction():
    lungs = ("X-Ray Lungs", "X-Ray", "2D")
    dataset = _dataset(
        [_example(*lungs, "C", 0, 1, _rect(40, 50, 100, 120)), _example(*lungs, "D", 0, 1, _ell(30, 30, 90, 110))]
    )
    # Paper protocol at 256 px: every side of the tight box moves out by 9 px.
    expected_c = dice_score(_rect(31, 41, 109, 129), _rect(40, 50, 100, 120))
    expected_d = dice_score(_rect(21, 21, 99, 119), _ell(30, 30, 90, 110))
    cases = box_filling_cases(dataset, PAPER)
    assert [c.case_id for c in cases] == ["C", "D"]
    assert cases[0].objects[0].dsc == pytest.approx(expected_c) and cases[1].objects[0].dsc == pytest.approx(
        expected_d
    )
    assert aggregate(cases)["tasks"][0]["dsc"] == pytest.approx((expected_c + expected_d) / 2)
    assert 0 < expected_d < expected_c < 1


def test_train_command_uses_only_training_arguments_and_the_validation_split():
    args = table3.parse_args(["--model", "m", "--data", "d", "--max_steps", "3"])
    command = table3.train_command(args, table3.ROWS["decoder-only (MedSAM)"], seed=1, output_dir=Path("o"))
    options = dict(zip(command[4::2], command[5::2]))
    assert options["--eval_split"] == "validation" and options["--metric_for_best_model"] == "dsc"
    assert options["--load_best_model_at_end"] == "true" and options["--train_neck"] == "false"
    assert options["--use_conv_branch"] == "false" and options["--seed"] == "1"
    full = table3.train_command(args, table3.ROWS["+ fusion (DB-SAM)"], seed=1, output_dir=Path("o"))
    assert dict(zip(full[4::2], full[5::2]))["--use_fusion"] == "true"


@pytest.mark.slow
def test_table3_runs_end_to_end_on_a_few_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)
    output = tmp_path / "table3"
    argv = ["--data", "data/nuclei", "--output", str(output), "--seeds", "0", "--rows", "+ fusion (DB-SAM)"]
    argv += ["--max_steps", "2", "--eval_steps", "1", "--batch_size", "2", "--jobs", "1"]
    assert table3.main(argv) == 0
    summary = json.loads((output / "table3.json").read_text())
    row = summary["rows"]["+ fusion (DB-SAM)"]
    assert row["seeds"] == [0] and 0.0 <= row["dsc_mean"] <= 1.0 and row["dsc_std"] == 0.0
    trained = (output / "fusion-db-sam" / "seed0" / "training_config.yaml").read_text()
    assert "eval_split: validation" in trained and "use_fusion: true" in trained
    box = summary["references"]["filling the box"]
    assert 0.0 < box["dsc"] < 1.0 and (output / "table3.png").stat().st_size > 0
    assert "filling the box" in (output / "table3.md").read_text()
    assert np.isfinite(summary["wall_seconds"])


def test_a_rerun_with_other_settings_does_not_reuse_finished_runs(tmp_path):
    table3.check_settings(table3.parse_args(["--output", str(tmp_path), "--learning_rate", "1e-3"]), tmp_path)
    more_seeds = ["--output", str(tmp_path), "--learning_rate", "1e-3", "--seeds", "3", "--jobs", "1"]
    table3.check_settings(table3.parse_args(more_seeds), tmp_path)  # other runs of the same experiment
    with pytest.raises(SystemExit, match=r"other settings \(learning_rate 0.001 -> 0.0001\)"):
        table3.check_settings(table3.parse_args(["--output", str(tmp_path)]), tmp_path)
