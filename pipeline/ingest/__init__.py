"""Stage 1: archive (DICOM + NIfTI) → pseudonymised, validated manifest (see data_manifests/README.md)."""

from pipeline.ingest.manifest import ingest, load_manifest
from pipeline.ingest.nifti import read_volume

__all__ = ["ingest", "load_manifest", "read_volume"]
