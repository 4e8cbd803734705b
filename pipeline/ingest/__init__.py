"""Stage 1: archive (DICOM + NIfTI) → pseudonymised, validated manifest (see data_manifests/README.md)."""

from pipeline.ingest.manifest import ingest
from pipeline.ingest.nifti import read_volume
from pipeline.ingest.outputs import load_manifest

__all__ = ["ingest", "load_manifest", "read_volume"]
