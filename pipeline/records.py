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

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from torch import nn

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

# Default of `ingest --max-voxels` / `data.max_voxels`: the most voxels (rows × columns × frames × samples)
# one file or one image unit may declare before it is quarantined as too-large, unread. Above any
# clinical image (a 2000-slice 512 × 512 CT is 5.2e8, a 70-slice 3328 × 4096 tomosynthesis 9.5e8);
# such a unit decodes to about 6 GB of float32.
MAX_VOXELS = 1_500_000_000


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
    """How a pretrained backbone was adapted; logged to MLflow and shown in the report.

    `mean`, `std`, `input_size` and `interpolation` are the backbone's pretraining preprocessing
    (its registry entry); `train` builds the PrepareSpec with this mean/std and interpolation.
    """

    backbone: str
    weights: str  # "imagenet", "none", "transfusion" or a path
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
    interpolation: str = "bicubic"  # resize interpolation of the pretraining preprocessing (bilinear | bicubic)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Cohort:
    """The labelled manifest rows of one experiment, split (run → prepare, finetune, evaluate).

    `frame` holds manifest rows (see `MANIFEST_COLUMNS`) with a non-empty `label`, as strings;
    `classes` are the label values in class-index order (numeric order when they are numbers).
    """

    manifest_dir: Path
    frame: pd.DataFrame
    classes: list[str]

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split (`train`, `val` or `test`), index reset."""
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    def y(self, frame: pd.DataFrame) -> np.ndarray:
        """Class indices (int, (N,)) of `frame`'s labels."""
        return frame["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy(dtype=int)

    def prevalence(self) -> dict[str, float]:
        """Binary tasks: split → fraction of its patients with an image of the positive class (the last); else {}."""
        if len(self.classes) != 2:
            return {}
        out = {}
        for name in ("train", "val", "test"):
            part = self.split(name)
            if len(part):
                positive = part.loc[part["label"] == self.classes[1], "subject_id"].nunique()
                out[name] = positive / part["subject_id"].nunique()
        return out


@dataclass(frozen=True)
class PrepareSpec:
    """Everything needed to reproduce preprocessing; saved with the model for scoring.

    `size` is (H, W) for 2d and 2.5d, (D, H, W) for 3d (voxels after resizing); `spacing` (mm, same
    axis order) resamples first when set; `slices` is the number of 2.5d channels; `mean`/`std`
    are the backbone's normalisation after the preset's window maps intensities to [0, 1];
    `reduce` (none | mip | mean | center) projects a volume along z for a 2d model.
    """

    dims: str
    preset: str
    size: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    slices: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bicubic"
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    reduce: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """sha256 (16 hex) of the spec: the prepare half of the cache key.

        ``reduce`` enters the hash only when set, so specs from before it existed keep their key.
        """
        d = self.as_dict()
        if d["reduce"] == "none":
            del d["reduce"]
        blob = json.dumps(d, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def channels(self) -> int:
        """Input channels of a prepared tensor: `slices` for 2.5d, else 1."""
        return self.slices if self.dims == "2.5d" else 1


@dataclass
class TrainResult:
    """What training returns (finetune → run); `model` holds the best epoch's weights.

    `history` maps a metric name (train_loss, val_loss, val_auroc, lr, epoch_seconds, ...) to one
    value per epoch; `best_metric` is the early-stopping metric at `best_epoch` (a 0-based index
    here; the console, MLflow's `best_epoch` and steps and the report number epochs from 1).
    """

    model: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    best_metric: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    class_weights: list[float] = field(default_factory=list)
    trainable_by_phase: list[int] = field(default_factory=list)
    device: str = "cpu"
    resumed_from: int = -1  # first epoch trained after a resume; -1 for an uninterrupted run


@dataclass
class CalibrationChoice:
    """Which calibration evaluation fitted on validation, and why (`evaluate.choose_calibration`).

    `requested` is `evaluate.calibration` (a method, or "auto"); `method` the one fitted
    (temperature | vector | isotonic | none). `reason` is one sentence for the report. `n_val` and
    `smallest_class` count validation images (all, and of the rarest class); `minimum` is the
    smallest-class count the requested method needs (0 for none). `cv_nll` holds, for "auto", the
    out-of-fold validation NLL of each candidate (patient-grouped folds; "none" is plain softmax).
    """

    requested: str
    method: str
    reason: str
    n_val: int
    smallest_class: int
    minimum: int = 0
    cv_nll: dict[str, float] = field(default_factory=dict)
    undersized: bool = False  # an explicitly requested method fitted on fewer images than it needs


@dataclass
class EvaluationSummary:
    """What evaluation returns (evaluate → run, MLflow, report): calibrated on val, measured on test.

    Probabilities are float64 arrays shaped (N, C), rows in split order, columns in class-index
    order. `metrics` are the flat MLflow names (test_auroc, test_auroc_ci_low, test_ece, ...).
    `temperature` is set for calibration "temperature" only, None otherwise; `calibrator` is the
    fitted `evaluate.Calibrator` itself. `operating_points` (binary tasks) are chosen on val and
    frozen: one dict per rule with rule, threshold and the val and test counts and rates (test
    also `<rate>_ci` = [low, high] patient-bootstrap 95% CIs, or None). `notes` include missed
    operating-point targets and rules that chose the same threshold.
    `subgroups` holds one row per (attribute, value); `reliability` the binned tables before and
    after calibration; `discrimination` the test AUROC/AUPRC and, at the arg-max (P ≥ 0.5 for binary),
    accuracy/F1/confusion matrix, plus for binary tasks with operating points `deployed`: the same
    decision metrics at the first rule's frozen threshold, where the packaged model decides;
    `calibration` which calibration was fitted and why (`CalibrationChoice`).
    """

    metrics: dict[str, float]
    temperature: float | None
    operating_points: list[dict[str, Any]]
    subgroups: list[dict[str, Any]]
    calibrator: Any
    probs_val: np.ndarray
    probs_test: np.ndarray
    probs_test_uncalibrated: np.ndarray
    reliability: dict[str, Any]
    discrimination: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    calibration: CalibrationChoice | None = None


@dataclass(eq=False)
class Packaged:
    """A packaged model loaded for scoring and what scoring reads from its medxfer metadata.

    Built by `pipeline.score.load_packaged`; travels from loading to the engines and the output table.

    Attributes:
        model: the packaged network (`adapt.CalibratedNet`), in eval mode. Input: prepared float32
            tensors (B, C, H, W) for 2D/2.5D or (B, C, D, H, W) for 3D; output: calibrated
            probabilities (B, n_classes) float32, columns in the order of `classes`.
        meta: the model's medxfer metadata (keys prepare, classes, temperature, operating_point,
            modalities, reference_stats, ...): the ``metadata`` of its verified ``model.json``
            (`adapt.package`), as logged by `run.log_packaged`.
        uri: the URI it was loaded from (``models:/NAME/VERSION``, ``runs:/ID/model`` or an absolute path).
        spec: the `PrepareSpec` the model was trained with (from ``meta["prepare"]``).
        classes: class labels as strings, in output-column order.
        threshold: the operating point, a probability of class 1 in [0, 1] (binary models), else None.
        reference: training-set ``reference_stats`` (`pipeline.evaluate.DomainStats.summary`
            schema: intensities in the normalised units of prepared tensors), or None.
        fingerprint: SHA-256 (hex) of the weights (`pipeline.io.state_sha256`).
        version: the registry version when `uri` names one (``"3"``), else ``"sha256:<12 hex>"``.
        modalities: DICOM modality codes the model accepts (``meta["modalities"]``, else the preset's).
        train_prevalence: binary models: the train split's share of positive patients
            (``meta["prevalence_train"]``, recorded at packaging since lp-ft's release), else None.
    """

    model: nn.Module
    meta: dict[str, Any]
    uri: str
    spec: PrepareSpec
    classes: list[str]
    threshold: float | None
    reference: dict[str, Any] | None
    fingerprint: str
    version: str
    modalities: set[str]
    train_prevalence: float | None = None

    @property
    def prob_columns(self) -> list[str]:
        """Probability columns of the output table: ``prob`` (binary: P(class 1)) or ``prob_<class>``."""
        return ["prob"] if len(self.classes) == 2 else [f"prob_{c}" for c in self.classes]


@dataclass
class Comparison:
    """A paired, patient-clustered comparison of evaluated runs on the same test units (`pipeline.compare`).

    `runs[0]` is the reference; `pairs[i]` compares `runs[i + 1]` with it, every difference being
    that run − the reference. All runs scored exactly the same test images (matched by `image_id`)
    with the same labels, from the same manifest.

    Attributes:
        reference: the reference run's id (`runs[0]["run_id"]`).
        runs: one dict per run: run_id, run_name, experiment_id, weights, backbone, strategy,
            manifest_hash, test_split_id, logged_test_auroc, auroc (of `auroc_scores`: the
            "uncalibrated" softmax, as the logged test_auroc, or "calibrated" for runs that predate
            that column), brier, ece, nll (calibrated probabilities), and threshold_rule, threshold,
            sensitivity, specificity at the run's own frozen threshold (its first operating point,
            where its model decides).
        pairs: one dict per other run: run_id, reference, negative_transfer (a pretrained run, e.g.
            ImageNet-initialised, whose clustered-DeLong ΔAUROC CI lies below 0 against a
            from-scratch reference), and per quantity a dict with value_a (this run), value_b
            (reference), diff, ci_low, ci_high, p, method: "auroc" (patient-clustered DeLong,
            Obuchowski 1997: also se and z), "auroc_bootstrap", "brier", "ece", "nll",
            "sensitivity", "specificity" (paired bootstrap of patients, with n_boot = resamples
            used; None when n_boot is 0 or, for the rates, a run has no frozen threshold).
        n_images, n_patients, n_positive, n_negative: the shared test units (positive = class 1).
        n_boot, seed: the paired bootstrap's resamples and seed (the same resamples for every quantity).
        notes: what the reader should know (e.g. the AUROC of a run computed from calibrated scores).
        mlflow_run_id: the MLflow run the comparison was logged to, once logged.
    """

    reference: str
    runs: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    n_images: int
    n_patients: int
    n_positive: int
    n_negative: int
    n_boot: int
    seed: int
    notes: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (comparison.json): plain data, no pseudonyms."""
        return asdict(self)
