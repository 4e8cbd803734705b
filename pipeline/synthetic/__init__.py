"""Realistic synthetic DICOM cohorts (chest X-ray 2D, chest CT 3D) with a known answer."""

from pipeline.synthetic.cohort import KINDS, SyntheticCohort, make_cohort

__all__ = ["KINDS", "SyntheticCohort", "make_cohort"]
