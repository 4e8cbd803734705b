"""DICOM series → image units: grouped by geometry and acquisition, slices sorted, voxel → RAS affine."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.ingest.dicom import DicomHeader
from pipeline.ingest.pseudonym import pseudonym
from pipeline.records import QuarantineEntry

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class UnitPlan:
    """One image unit to decode: frames in slice order and the voxel → RAS affine (before canonical)."""

    image_id: str
    subject_id: str
    study_id: str
    series_id: str
    modality: str
    manufacturer: str
    source_format: str
    frames: list[tuple[str, int]]  # (relpath, frame index; -1 = the file's only frame)
    affine: list[list[float]] | None
    warnings: list[str] = field(default_factory=list)
    pixels: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath → DicomHeader.pixel

    @property
    def files(self) -> list[str]:
        """The unit's distinct files (relpaths), sorted."""
        return sorted({rel for rel, _ in self.frames})


# ----------------------------------------------------------------------------------------- grouping


def _stackable(h: DicomHeader) -> bool:
    return h.n_frames == 1 and bool(h.iop) and bool(h.ipp) and h.frame_ipp is None


def _geometry_key(h: DicomHeader) -> str:
    iop = ",".join(f"{v:.3f}" for v in np.round(h.iop or [], 3) + 0.0)
    spacing = ",".join(f"{v:.4f}" for v in h.spacing or [])
    return f"iop={iop};size={h.rows}x{h.cols};ps={spacing}"


def _repeats(positions: list[list[float]], iop: list[float]) -> int:
    """How many slices share a position with another (positions projected on the slice normal, 0.01 mm)."""
    proj = np.round(np.asarray(positions) @ np.cross(iop[:3], iop[3:]), 2)
    return len(proj) - len(set(proj.tolist()))


def _overlap(members: list[DicomHeader]) -> int:
    return _repeats([h.ipp for h in members], members[0].iop)  # type: ignore[misc, arg-type]


def _split_duplicates(
    gkey: str, members: list[DicomHeader], quarantine: list[QuarantineEntry]
) -> list[tuple[str, list[DicomHeader]]]:
    """Slices sharing a position: split by acquisition, else quarantine (copies of an instance are gone already)."""
    if not _overlap(members):
        return [(gkey, members)]
    by_acq: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in members:
        by_acq[h.acquisition].append(h)
    if len(by_acq) > 1 and not any(_overlap(g) for g in by_acq.values()):
        return [(f"{gkey};acq={a}", g) for a, g in sorted(by_acq.items())]
    n_positions = len(members) - _overlap(members)
    for h in members:
        quarantine.append(
            QuarantineEntry(
                h.relpath,
                "inconsistent-series",
                f"{len(members)} slices of one series at only {n_positions} distinct "
                "positions (several stacks or repeated scans in one series)",
            )
        )
    return []


def plan_units(headers: list[DicomHeader], key: bytes) -> tuple[list[UnitPlan], list[QuarantineEntry]]:
    """Group headers into image units: by series, split by orientation/size/spacing and acquisition.

    Single-frame files with position and orientation are stacked; every other file (2D
    radiographs, multi-frame files) is a unit of its own.

    Args:
        headers: The header of every DICOM file that passed `read_header`, one per SOPInstanceUID
            (ingest quarantines further copies as duplicate-of first).
        key: Pseudonym key; image_ids are keyed hashes of the series and, when it splits, the split.

    Returns:
        The units, and quarantine entries for the files left out: series holding several stacks at
        the same positions, multi-frame files repeating a position.
    """
    series: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in sorted(headers, key=lambda h: h.relpath):
        series[h.series_key].append(h)
    plans: list[UnitPlan] = []
    quarantine: list[QuarantineEntry] = []
    for series_key, members in sorted(series.items()):
        groups: dict[str, list[DicomHeader]] = defaultdict(list)
        for h in members:
            groups[_geometry_key(h) if _stackable(h) else f"file={h.sop_key}"].append(h)
        units = []
        for gkey, group in sorted(groups.items()):
            if _stackable(group[0]):
                units += _split_duplicates(gkey, group, quarantine)
            elif group[0].frame_ipp and _repeats(group[0].frame_ipp, group[0].iop or []):
                quarantine.append(
                    QuarantineEntry(
                        group[0].relpath,
                        "unsupported",
                        "multi-frame file with repeated frame positions (several stacks or time points)",
                    )
                )
            else:
                units.append((gkey, group))
        for split_key, group in units:
            image_key = series_key if len(units) == 1 else f"{series_key}|{split_key}"
            plans.append(_plan(group, pseudonym(key, "image", image_key)))
    return plans, quarantine


def _plan(group: list[DicomHeader], image_id: str) -> UnitPlan:
    h = group[0]
    notes = sorted({w for m in group for w in m.warnings})
    entries: list[tuple[str, int, list[float]]] = []
    if _stackable(h):
        entries = [(m.relpath, -1, m.ipp) for m in group if m.ipp]
    elif h.frame_ipp:
        entries = [(h.relpath, i, p) for i, p in enumerate(h.frame_ipp)]
    if entries:
        frames, affine, more = _stack(entries, h, [m.thickness for m in group])
    else:
        frames = [(h.relpath, i if h.n_frames > 1 else -1) for i in range(h.n_frames)]
        affine, more = _flat_affine(h)
    return UnitPlan(
        image_id,
        h.subject_id,
        h.study_id,
        h.series_id,
        h.modality,
        h.manufacturer,
        "dicom",
        frames,
        affine,
        notes + more,
        {m.relpath: m.pixel for m in group if m.pixel},
    )


def _in_plane(h: DicomHeader) -> tuple[list[float], list[str]]:
    if h.spacing and len(h.spacing) == 2 and min(h.spacing) > 0:
        return h.spacing, []
    return [1.0, 1.0], ["no PixelSpacing or ImagerPixelSpacing: 1 mm pixels assumed"]


def _flat_affine(h: DicomHeader) -> tuple[list[list[float]], list[str]]:
    """No patient geometry (radiographs, cine): x = column, y = row, z = frame, spacing on the diagonal."""
    (row_mm, col_mm), notes = _in_plane(h)
    dz = h.slice_gap or h.thickness or 1.0
    if h.n_frames > 1:
        notes.append("multi-frame file without frame positions: frames stacked along z in stored order")
    return np.diag([col_mm, row_mm, dz, 1.0]).tolist(), notes


def _stack(
    entries: list[tuple[str, int, list[float]]], h: DicomHeader, thicknesses: list[float | None]
) -> tuple[list[tuple[str, int]], list[list[float]], list[str]]:
    """Sort slices by position along the slice normal; build the LPS affine and flip it to RAS."""
    row, col = np.asarray(h.iop[:3]), np.asarray(h.iop[3:])  # type: ignore[index]
    normal = np.cross(row, col)
    pos = np.array([e[2] for e in entries], dtype=np.float64)
    order = np.argsort(pos @ normal, kind="stable")
    pos = pos[order]
    (row_mm, col_mm), notes = _in_plane(h)
    if len(entries) > 1:
        gaps = np.diff(pos @ normal)
        step_n = float(np.median(gaps))
        notes += _spacing_warnings(gaps, step_n)
        direction = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
        cos = float(direction @ normal)
        step = direction * (step_n / cos)
        if cos < 0.9999:
            notes.append("slices are not stacked along the slice normal (gantry tilt?): the affine is sheared")
    else:
        step = normal * (h.slice_gap or h.thickness or 1.0)
        if np.argmax(np.abs(normal)) != 2:
            notes.append("single sagittal or coronal slice: in RAS order its one-voxel axis is x or y, not z")
    distinct = sorted({round(t, 3) for t in thicknesses if t})
    if len(distinct) > 1:
        notes.append(f"mixed slice thickness: {', '.join(f'{t:g}' for t in distinct)} mm")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * col_mm, col * row_mm, step, pos[0]
    frames = [(entries[i][0], entries[i][1]) for i in order]
    return frames, (_LPS_TO_RAS @ affine).tolist(), notes


def _spacing_warnings(gaps: np.ndarray, step: float) -> list[str]:
    notes = []
    missing = [round(g / step) - 1 for g in gaps if g > 1.5 * step]
    if missing:
        notes.append(f"gap: {sum(missing)} missing slice(s) at {len(missing)} place(s) (slice spacing {step:.4g} mm)")
    irregular = [g for g in gaps if abs(g - step) > max(0.01 * step, 0.01) and g <= 1.5 * step]
    if irregular:
        notes.append(f"irregular slice spacing: {gaps.min():.4g} to {gaps.max():.4g} mm (median {step:.4g} mm)")
    return notes
