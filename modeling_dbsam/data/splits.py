"""Case-level train / validation / test splits: a patient never lands in two splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modeling_dbsam.data.pairing import RawCase

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT = (0.8, 0.1, 0.1)


def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` as (train, validation, test) fractions that sum to 1."""
    values = [float(v) for v in text.split(",")] if isinstance(text, str) else [float(v) for v in text]
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions train,validation,test summing to 1; got {text!r}"
        )
    return tuple(values)


def assign_splits(
    cases: Sequence[RawCase], fractions: tuple[float, float, float] | None = None, seed: int = 0
) -> dict[str, list[RawCase]]:
    """Split cases (never slices) by a seeded shuffle; cases with a fixed split (``imagesTs``) keep it.

    Without ``fractions``, unassigned cases are all ``train`` when fixed test cases exist and split
    0.8/0.1/0.1 otherwise. Counts follow the fractions by largest remainder. Empty splits are omitted.
    """
    free = sorted((c for c in cases if c.split is None), key=lambda c: c.case_id)
    if fractions is None:
        fractions = (1.0, 0.0, 0.0) if len(free) < len(cases) else DEFAULT_SPLIT
    exact = np.array(fractions) * len(free)
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: len(free) - counts.sum()]:
        counts[index] += 1
    order = np.random.default_rng(seed).permutation(len(free))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    splits = {name: [free[i] for i in order[bounds[k] : bounds[k + 1]]] for k, name in enumerate(SPLITS)}
    for case in cases:
        if case.split is not None:
            splits[case.split].append(case)
    return {name: sorted(members, key=lambda c: c.case_id) for name, members in splits.items() if members}


def carve_validation(dataset, fraction: float, seed: int = 0):
    """Split a dataset into (train, validation) by case with :func:`assign_splits`: every slice of a case
    (task + case id) lands on one side, so model selection never sees a training case's slices."""
    keys = [f"{task}/{case}" for task, case in zip(dataset["task"], dataset["case_id"])]
    cases = [RawCase(key, "", "") for key in sorted(set(keys))]
    chosen = {
        case.case_id for case in assign_splits(cases, (1.0 - fraction, fraction, 0.0), seed).get("validation", [])
    }
    if not chosen or len(chosen) == len(cases):
        raise ValueError(
            f"validation_fraction {fraction} of {len(cases)} cases leaves "
            f"{'no validation' if not chosen else 'no training'} case: a validation split is carved by case"
        )
    in_validation = [key in chosen for key in keys]
    train = dataset.select([i for i, inside in enumerate(in_validation) if not inside])
    return train, dataset.select([i for i, inside in enumerate(in_validation) if inside])
