"""MedSAM-format datasets for DB-SAM: the 30 tasks, loaders of the authors' layouts, raw-volume import,
the box-prompt transform, dataset cards.

>>> from modeling_dbsam.data import load_medsam_dataset, SamBoxTransform
>>> ds = load_medsam_dataset("/data/MedSAM")                        # DatasetDict, Arrow-backed
>>> train = ds["train"].with_transform(SamBoxTransform(processor, max_shift=20, seed=0))
"""

from modeling_dbsam.data.card import dataset_card, merge_card, push_to_hub_with_card
from modeling_dbsam.data.medsam import detect_layout, load_medsam_dataset, read_npz_case
from modeling_dbsam.data.raw import ImportReport, prepare_raw_dataset
from modeling_dbsam.data.save import atomic_folder, save_dataset
from modeling_dbsam.data.schema import FEATURES
from modeling_dbsam.data.splits import assign_splits
from modeling_dbsam.data.tasks import TASKS, UNKNOWN_TASK, Task, resolve_task
from modeling_dbsam.data.transforms import SamBoxTransform, collate_batch, example_rng

__all__ = [
    "FEATURES",
    "TASKS",
    "UNKNOWN_TASK",
    "ImportReport",
    "SamBoxTransform",
    "Task",
    "assign_splits",
    "collate_batch",
    "atomic_folder",
    "dataset_card",
    "detect_layout",
    "example_rng",
    "load_medsam_dataset",
    "merge_card",
    "prepare_raw_dataset",
    "push_to_hub_with_card",
    "read_npz_case",
    "resolve_task",
    "save_dataset",
]
