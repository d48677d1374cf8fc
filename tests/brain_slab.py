"""The real brain MR and AAL atlas slab shipped in ``data/brain_slab`` (see its README for provenance)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "data" / "brain_slab"
MR = str(FOLDER / "ch2_z60-86.nii.gz")
ATLAS = str(FOLDER / "aal_z60-86.nii.gz")
FIRST_SLICE = 60
"""Slice k of the slab is axial slice FIRST_SLICE + k of mricron's ch2.nii.gz / aal.nii.gz."""
