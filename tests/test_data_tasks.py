"""The task registry against the paper's Tables 1 and 2, and the rules that name folders and files."""

import pytest

from modeling_dbsam.data.tasks import SOURCES, TASKS, guess_modality, resolve_task
from modeling_dbsam.intensity import CT_WINDOW_PRESETS

# (structure, modality) rows of Table 1 (3D) and Table 2 (2D), in the paper's order.
PAPER_TABLE_1 = [
    ("Brain Ventricles", "MR-T1"), ("Brain Ventricles", "MR-T2"), ("Brain Tumor", "MR-FLAIR"),
    ("Cerebellum", "MR-T1"), ("Cerebellum", "MR-T2"), ("Gallbladder", "MR"), ("Left Ventricle", "MR"),
    ("Right Ventricle", "MR"), ("Liver", "MR"), ("Pancreas", "MR"), ("Prostate", "MR-ADC"), ("Prostate", "MR-T2"),
    ("Abdomen Tumor", "CT"), ("Gallbladder", "CT"), ("Head-Neck Tumor", "CT"), ("Liver", "CT"),
    ("Lung Infections", "CT"), ("Pancreas", "CT"), ("Pleural Effusion", "CT"), ("Stomach", "CT"),
    ("Head-Neck Tumor", "PET"),
]  # fmt: skip
PAPER_TABLE_2 = [
    ("Breast Tumor", "Ultrasound"), ("Liver", "Ultrasound"), ("Vessel", "Ultrasound"), ("Heart", "X-Ray"),
    ("Lungs", "X-Ray"), ("Polyp", "Endoscope"), ("Instrument", "Endoscope"), ("Retinal Vessel", "Retinal Image"),
    ("Gland", "Pathology"),
]  # fmt: skip


def test_registry_is_the_papers_tables_in_order():
    rows = [(t.structure, t.modality, t.dimension) for t in TASKS.values()]
    expected = [(s, m, "3D") for s, m in PAPER_TABLE_1] + [(s, m, "2D") for s, m in PAPER_TABLE_2]
    assert rows == expected
    assert [t.index for t in TASKS.values()] == list(range(1, 31))
    assert all(name == f"{t.modality} {t.structure}" for name, t in TASKS.items())


def test_sources_and_ct_windows_are_defined():
    for task in TASKS.values():
        assert task.sources and all(source in SOURCES for source in task.sources), task.name
        if task.modality == "CT":
            assert task.ct_window in CT_WINDOW_PRESETS, task.name
        else:
            assert task.ct_window is None, task.name
    assert TASKS["CT Lung Infections"].ct_window == "lung"
    # The paper names no source for the ultrasound tasks: the registry must not invent one.
    assert all(TASKS[f"Ultrasound {s}"].sources == ("MedSAM collection",) for s in ("Breast Tumor", "Liver", "Vessel"))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("01-MR-T1_Brain_Ventricle", "MR-T1 Brain Ventricles"),
        ("02-MR-T2_Brain_Ventricle", "MR-T2 Brain Ventricles"),
        ("17-CT_Lungs", "CT Lung Infections"),
        ("20-CT_Stomach", "CT Stomach"),
        ("CT_AbdTumor", "CT Abdomen Tumor"),
        ("15-CT_HNTumor", "CT Head-Neck Tumor"),
        ("PET_HNTumor", "PET Head-Neck Tumor"),
        ("liver_ct", "CT Liver"),
        ("ct liver", "CT Liver"),
        ("MR_LV", "MR Left Ventricle"),
        ("MR_Heart_RV", "MR Right Ventricle"),
        ("XRay_Lungs", "X-Ray Lungs"),
        ("US_Breast", "Ultrasound Breast Tumor"),
        ("Fundus_Vessels", "Retinal Image Retinal Vessel"),
        ("Pathology_GlaS", "Pathology Gland"),
        ("MR_BraTS_FLAIR", "MR-FLAIR Brain Tumor"),
        ("covid19 ct", "CT Lung Infections"),
    ],
)
def test_authors_and_user_names_resolve(name, expected):
    assert resolve_task(name).name == expected


@pytest.mark.parametrize(
    "name", ["22-2D-Images", "Task03_Liver", "liver", "MR ventricle", "MR prostate", "tumor", "CT_Abd_FLARE22_Tr_0001"]
)
def test_ambiguous_or_unrelated_names_resolve_to_none(name):
    assert resolve_task(name) is None


def test_every_canonical_name_survives_respelling():
    for name, task in TASKS.items():
        for spelling in (name, name.lower(), name.replace(" ", "_"), name.upper().replace(" ", "-")):
            assert resolve_task(spelling) is task, spelling


def test_modality_guess():
    assert guess_modality("CT_Abd_FLARE22_Tr_0001") == "CT"
    assert guess_modality("01-MR-T1_Brain_Ventricle") == "MR-T1"
    assert guess_modality("22-2D-Images") is None
