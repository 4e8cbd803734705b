"""The records that flow between stages: one data contract, written once.

Axis and unit conventions used everywhere in medxfer:

* Volumes on disk (``images/<image_id>.nii.gz``) are RAS-oriented NIfTI; the array axes are
  (X, Y, Z) as nibabel returns them, the affine maps voxel indices to RAS millimetres.
  CT values are Hounsfield units (rescale slope/intercept applied); MONOCHROME1 images are
  inverted at ingest so that larger always means brighter. 2D images are stored as volumes
  with Z = 1.
* Prepared tensors (the output of ``prepare``) are float32 torch tensors shaped
  (C, H, W) for 2D and 2.5D (C = number of slices as channels), and (C, D, H, W) for 3D,
  where D runs inferior→superior. Intensities are already normalised with the backbone's
  pretraining mean/std.
* Spacing is always millimetres, in the array's axis order.
* Identifiers (image_id, subject_id, study_id, series_id) are keyed-hash pseudonyms: no
  patient name, ID, date of birth, accession number or UID ever appears in a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Columns of data_manifests/<name>/manifest.parquet, in order (see data_manifests/README.md).
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id",
    "subject_id",
    "study_id",
    "series_id",
    "modality",
    "source_format",
    "image_path",
    "shape",
    "spacing_mm",
    "n_files",
    "content_sha256",
    "label",
    "split",
    "manufacturer",
    "warnings",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class QuarantineEntry:
    """A rejected input file: `path` is relative to the archive root; `reason` is a short code."""

    path: str
    reason: str
    detail: str = ""


@dataclass
class IngestResult:
    """What `ingest` returns: where the manifest is and what happened."""

    manifest_dir: str
    n_units: int
    n_quarantined: int
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdaptationSummary:
    """How a pretrained backbone was adapted; logged to MLflow and shown in the report."""

    backbone: str
    weights: str  # "imagenet", "none" or a path
    weights_file: str | None  # resolved file actually loaded (None when from scratch)
    weights_sha256: str | None
    dims: str  # "2d" | "2.5d" | "3d"
    in_channels: int
    channel_method: str  # e.g. "sum-fold RGB->1", "repeat-rescale RGB->5", "none"
    inflation: str | None  # "i3d-mean" | "i3d-center" | None for 2D
    num_classes: int
    depth_padding: str | None = None  # "replicate" | "zeros" for 3D, None for 2D
    keep_depth: int | None = None  # 3D: downsampling levels that keep every slice, None for 2D
    pool: str = "avg"  # global pooling of the last feature map: avg | max | catavgmax
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    input_size: tuple[int, ...] = (224, 224)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(eq=False)
class Packaged:
    """A packaged model loaded for scoring and what scoring reads from its medxfer metadata.

    Built by `pipeline.score.load_packaged`; travels from loading to the engines and the output table.

    Attributes:
        model: the packaged network (`tracking.CalibratedNet`), in eval mode. Input: prepared float32
            tensors (B, C, H, W) for 2D/2.5D or (B, C, D, H, W) for 3D; output: calibrated
            probabilities (B, n_classes) float32, columns in the order of `classes`.
        meta: the model's medxfer metadata (keys prepare, classes, temperature, operating_point,
            modalities, reference_stats, ...), as logged by `tracking.log_model`.
        uri: the URI it was loaded from (``models:/NAME/VERSION``, ``runs:/ID/model`` or an absolute path).
        spec: the `pipeline.prepare.PrepareSpec` the model was trained with (from ``meta["prepare"]``).
        classes: class labels as strings, in output-column order.
        threshold: the operating point, a probability of class 1 in [0, 1] (binary models), else None.
        reference: training-set ``reference_stats`` (`pipeline.evaluate.DomainStats.summary`
            schema: intensities in the normalised units of prepared tensors), or None.
        fingerprint: SHA-256 (hex) of the weights (`pipeline.io.state_sha256`).
        version: the registry version when `uri` names one (``"3"``), else ``"sha256:<12 hex>"``.
        modalities: DICOM modality codes the model accepts (``meta["modalities"]``, else the preset's).
    """

    model: Any
    meta: dict[str, Any]
    uri: str
    spec: Any
    classes: list[str]
    threshold: float | None
    reference: dict[str, Any] | None
    fingerprint: str
    version: str
    modalities: set[str]

    @property
    def prob_columns(self) -> list[str]:
        """Probability columns of the output table: ``prob`` (binary: P(class 1)) or ``prob_<class>``."""
        return ["prob"] if len(self.classes) == 2 else [f"prob_{c}" for c in self.classes]
