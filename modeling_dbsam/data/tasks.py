"""The paper's 30 segmentation tasks (Tables 1 and 2) and the rules that name a folder or file's task.

Canonical task names are ``"<modality> <structure>"`` with both parts spelled as in the paper's
tables: ``"MR-T1 Brain Ventricles"``, ``"CT Liver"``, ``"Ultrasound Breast Tumor"``,
``"Retinal Image Retinal Vessel"``. :func:`resolve_task` maps the authors' folder names
(``01-MR-T1_Brain_Ventricle``, ``17-CT_Lungs``) and free-form user names (``"liver ct"``,
``"CT_Liver"``) to them; a name it cannot place unambiguously resolves to ``None`` and loaders
record the task as :data:`UNKNOWN_TASK`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

UNKNOWN_TASK = "unknown"

SOURCES = {
    "DRIVE": "[1] DRIVE: Digital retinal images for vessel extraction, https://drive.grand-challenge.org",
    "PolypGen": "[2] Ali et al., PolypGen multi-centre polyp dataset, Scientific Data 2023",
    "HECKTOR": "[3] Andrearczyk et al., HECKTOR challenge (MICCAI 2020), head and neck tumour PET/CT",
    "BraTS": "[4, 17] BraTS brain tumour segmentation challenge",
    "ACDC": "[5] Bernard et al., ACDC cardiac MR challenge, IEEE TMI 2018",
    "LiTS": "[6] Bilic et al., Liver Tumor Segmentation benchmark (LiTS), MedIA 2023",
    "NCI-ISBI 2013": "[7] Bloch et al., NCI-ISBI 2013 prostate challenge (TCIA)",
    "M&Ms": "[12] Full et al., M&Ms cardiac MR challenge, STACOM 2021",
    "Garcia-Peraza-Herrera 2021": "[13] Garcia-Peraza-Herrera et al., surgical tool segmentation, IEEE TMI 2021",
    "KiTS19": "[14] Heller et al., KiTS19 kidney and kidney tumour challenge, MedIA 2021",
    "AMOS": "[16] Ji et al., AMOS abdominal multi-organ benchmark (CT and MR), 2022",
    "Kiser 2021": "[19, 20] Kiser et al., thoracic volume and pleural effusion segmentations (TCIA [11])",
    "PROMISE12": "[21] Litjens et al., PROMISE12 prostate MR challenge, MedIA 2014",
    "COVID-19 CT": "[23] Ma et al., COVID-19 CT lung and infection segmentation benchmark, Med Phys 2021",
    "AbdomenCT-1K": "[24] Ma et al., AbdomenCT-1K, IEEE TPAMI 2022",
    "FLARE": "[25] Ma et al., FLARE abdominal organ challenge, MedIA 2022",
    "ABCs": "[27] Shusharina et al., Anatomical Brain Barriers to Cancer Spread (CT and MR), 2020",
    "MSD": "[28] Simpson et al., Medical Segmentation Decathlon, 2019 (CC BY-SA 4.0)",
    "JSRT": "[26] Shiraishi et al., JSRT chest radiograph database, AJR 2000",
    "GlaS": "[29, 30] Sirinukunwattana et al., GlaS colon gland segmentation challenge",
    "MedSAM collection": "[22] Ma et al., MedSAM (Nature Communications 2024): the paper names no source",
}
"""Source datasets by short name, with the paper's reference numbers."""


@dataclass(frozen=True)
class Task:
    """One of the paper's tasks. ``ct_window`` names a preset of :data:`modeling_dbsam.intensity.CT_WINDOW_PRESETS`."""

    index: int
    modality: str
    structure: str
    dimension: str
    sources: tuple[str, ...]
    ct_window: str | None = None

    @property
    def name(self) -> str:
        return f"{self.modality} {self.structure}"


_TASK_LIST = (
    Task(1, "MR-T1", "Brain Ventricles", "3D", ("ABCs",)),
    Task(2, "MR-T2", "Brain Ventricles", "3D", ("ABCs",)),
    Task(3, "MR-FLAIR", "Brain Tumor", "3D", ("BraTS",)),
    Task(4, "MR-T1", "Cerebellum", "3D", ("ABCs",)),
    Task(5, "MR-T2", "Cerebellum", "3D", ("ABCs",)),
    Task(6, "MR", "Gallbladder", "3D", ("AMOS",)),
    Task(7, "MR", "Left Ventricle", "3D", ("ACDC", "M&Ms")),
    Task(8, "MR", "Right Ventricle", "3D", ("ACDC", "M&Ms")),
    Task(9, "MR", "Liver", "3D", ("AMOS",)),
    Task(10, "MR", "Pancreas", "3D", ("AMOS",)),
    Task(11, "MR-ADC", "Prostate", "3D", ("MSD",)),
    Task(12, "MR-T2", "Prostate", "3D", ("PROMISE12", "NCI-ISBI 2013", "MSD")),
    Task(13, "CT", "Abdomen Tumor", "3D", ("KiTS19", "LiTS", "MSD"), "abdomen"),
    Task(14, "CT", "Gallbladder", "3D", ("FLARE",), "abdomen"),
    Task(15, "CT", "Head-Neck Tumor", "3D", ("HECKTOR",), "soft_tissue"),
    Task(16, "CT", "Liver", "3D", ("LiTS", "AbdomenCT-1K", "FLARE", "MSD"), "abdomen"),
    Task(17, "CT", "Lung Infections", "3D", ("COVID-19 CT",), "lung"),
    Task(18, "CT", "Pancreas", "3D", ("AbdomenCT-1K", "FLARE", "MSD"), "abdomen"),
    Task(19, "CT", "Pleural Effusion", "3D", ("Kiser 2021",), "soft_tissue"),
    Task(20, "CT", "Stomach", "3D", ("FLARE",), "abdomen"),
    Task(21, "PET", "Head-Neck Tumor", "3D", ("HECKTOR",)),
    Task(22, "Ultrasound", "Breast Tumor", "2D", ("MedSAM collection",)),
    Task(23, "Ultrasound", "Liver", "2D", ("MedSAM collection",)),
    Task(24, "Ultrasound", "Vessel", "2D", ("MedSAM collection",)),
    Task(25, "X-Ray", "Heart", "2D", ("JSRT",)),
    Task(26, "X-Ray", "Lungs", "2D", ("JSRT",)),
    Task(27, "Endoscope", "Polyp", "2D", ("PolypGen",)),
    Task(28, "Endoscope", "Instrument", "2D", ("Garcia-Peraza-Herrera 2021",)),
    Task(29, "Retinal Image", "Retinal Vessel", "2D", ("DRIVE",)),
    Task(30, "Pathology", "Gland", "2D", ("GlaS",)),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
"""The 30 tasks by canonical name, in the order of the paper's Table 1 (3D) then Table 2 (2D)."""

# Modality words, checked in order; MR sequences refine plain MR.
_MODALITY_WORDS = (
    ("PET", ("pet",)),
    ("CT", ("ct",)),
    ("MR", ("mr", "mri", "mrt", "t1", "t1w", "t2", "t2w", "flair", "adc")),
    ("Ultrasound", ("us", "ultrasound", "sonography", "echo")),
    ("X-Ray", ("xray", "x ray", "cxr", "radiograph", "radiography")),
    ("Endoscope", ("endoscope", "endoscopy", "endoscopic", "colonoscopy", "laparoscopy")),
    ("Retinal Image", ("retinal image", "fundus", "retina", "retinal")),
    ("Pathology", ("pathology", "histology", "histopathology")),
)
_MR_SEQUENCES = (("MR-FLAIR", ("flair",)), ("MR-ADC", ("adc",)), ("MR-T1", ("t1", "t1w")), ("MR-T2", ("t2", "t2w")))

# Structure words: every phrase in a group must occur (a phrase is one or more whole words).
_STRUCTURE_WORDS = (
    ("Left Ventricle", (("left", "ventricle"), ("lv",))),
    ("Right Ventricle", (("right", "ventricle"), ("rv",))),
    ("Brain Ventricles", (("brain", "ventricle"), ("ventricle",))),
    ("Brain Tumor", (("brain", "tumor"), ("glioma",), ("brats",))),
    ("Head-Neck Tumor", (("head", "neck"), ("headneck",), ("hn", "tumor"), ("hnc",), ("hecktor",))),
    (
        "Abdomen Tumor",
        tuple((organ, "tumor") for organ in ("abdomen", "abd", "abdominal", "liver", "kidney", "pancreas", "colon")),
    ),
    ("Breast Tumor", (("breast",),)),
    ("Cerebellum", (("cerebellum",),)),
    ("Gallbladder", (("gallbladder",), ("gall bladder",))),
    ("Liver", (("liver",),)),
    ("Pancreas", (("pancreas",),)),
    ("Prostate", (("prostate",),)),
    ("Lung Infections", (("lung", "infection"), ("covid",), ("lung", "lesion"))),
    ("Lungs", (("lung",),)),
    ("Pleural Effusion", (("pleural",), ("effusion",))),
    ("Stomach", (("stomach",),)),
    ("Retinal Vessel", (("retinal", "vessel"), ("retina", "vessel"), ("fundus", "vessel"))),
    ("Vessel", (("vessel",), ("vascular",))),
    ("Heart", (("heart",), ("cardiac",))),
    ("Polyp", (("polyp",),)),
    ("Instrument", (("instrument",), ("tool",))),
    ("Gland", (("gland",), ("glas",))),
)
# Words a task name may use in plural or with British spelling.
_SINGULAR = {"ventricles": "ventricle", "tumors": "tumor", "tumour": "tumor", "tumours": "tumor", "lungs": "lung"}
_SINGULAR |= {"infections": "infection", "vessels": "vessel", "polyps": "polyp", "instruments": "instrument"}
_SINGULAR |= {"glands": "gland", "tools": "tool", "lesions": "lesion", "covid19": "covid"}


def _words(name: str) -> str:
    """Lower-case words of ``name``, bare numbers removed, once as written and once with camel case split
    (``"AbdTumor"``, but also ``"GlaS"``), separated by ``|`` so that no phrase spans both."""

    def normalise(text: str) -> str:
        tokens = [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t and not t.isdigit()]
        return " ".join(_SINGULAR.get(t, t) for t in tokens)

    camel_split = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return f" {normalise(name)} | {normalise(camel_split)} "


def _has(words: str, phrase: str) -> bool:
    return f" {phrase} " in words


@lru_cache(maxsize=65536)
def guess_modality(name: str) -> str | None:
    """The modality a name states (``"MR-T1"``, ``"CT"``, ...), or ``None``."""
    words = _words(name)
    for modality, phrases in _MODALITY_WORDS:
        if any(_has(words, p) for p in phrases):
            if modality == "MR":
                for sequence, sequence_words in _MR_SEQUENCES:
                    if any(_has(words, p) for p in sequence_words):
                        return sequence
            return modality
    return None


def _structure(words: str) -> str | None:
    for structure, groups in _STRUCTURE_WORDS:
        if any(all(_has(words, p) for p in group) for group in groups):
            return structure
    return None


@lru_cache(maxsize=65536)  # the slices of a case share its name
def resolve_task(name: str) -> Task | None:
    """The task a folder, file or user-supplied name refers to, or ``None`` if unknown or ambiguous.

    A canonical name matches itself. Otherwise the name's modality and structure words are
    matched: ``"17-CT_Lungs"`` is ``"CT Lung Infections"`` (the 3D CT task for the lungs),
    ``"XRay_Lungs"`` is ``"X-Ray Lungs"``; ``"liver"`` alone is ambiguous (CT, MR, Ultrasound).
    An MR sequence that the structure's task does not name (``"MR-T1 Liver"``) falls back to the
    structure's only MR task.
    """
    if name in TASKS:
        return TASKS[name]
    words = _words(name)
    modality = guess_modality(name)
    structure = _structure(words)
    if structure == "Lungs" and modality == "CT":
        structure = "Lung Infections"  # the collection's only CT lung task (the authors' folder: 17-CT_Lungs)
    if structure is None:
        return None
    candidates = [task for task in _TASK_LIST if task.structure == structure]
    if modality is not None:
        exact = [task for task in candidates if task.modality == modality]
        family = [task for task in candidates if task.modality.split("-")[0] == modality.split("-")[0]]
        candidates = exact or family
    return candidates[0] if len(candidates) == 1 else None
