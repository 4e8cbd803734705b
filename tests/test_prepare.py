"""Prepare stage: MONAI chains per preset with known answers, layouts per dims, and the cache."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, DataError
from pipeline.prepare import (
    PreparedDataset,
    build_augment,
    cache_path,
    make_spec,
    prepare_image,
    spec_from_dict,
)

HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _save(path: Path, array: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*zooms, 1.0])), str(path))
    return str(path)


def test_ct_lung_window_known_answer(tmp_path):
    vol = np.full((8, 8, 4), -1000.0)
    vol[:, :, 2:] = 400.0  # the superior half at the top of the window
    x = prepare_image(_save(tmp_path / "ct.nii", vol), make_spec("3d", "ct-lung", [4, 8, 8], HALF))
    assert x.shape == (1, 4, 8, 8)
    # -1000 HU → 0 → (0 - 0.5) / 0.5 = -1 ; 400 HU → 1 → +1 ; D runs inferior → superior
    assert torch.allclose(x[0, 0], torch.full((8, 8), -1.0), atol=1e-5)
    assert torch.allclose(x[0, 3], torch.full((8, 8), 1.0), atol=1e-5)


def test_soft_tissue_window_clips(tmp_path):
    vol = np.zeros((6, 6, 2))
    vol[0] = 3000.0  # bone far above the window
    vol[1] = 40.0  # window level → 0.5 → normalised 0
    x = prepare_image(_save(tmp_path / "ct.nii", vol), make_spec("3d", "ct-soft-tissue", [2, 6, 6], HALF))
    assert float(x.max()) == pytest.approx(1.0)
    assert float(x[0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-5)  # x index 1 → W index 1


def test_normalisation_comes_from_backbone_metadata(tmp_path):
    img = np.zeros((16, 16, 1))
    img[:8] = 1000.0
    spec = make_spec("2d", "xray", [16, 16], IMAGENET)
    assert spec.mean[0] == pytest.approx(np.mean(IMAGENET["mean"]))
    x = prepare_image(_save(tmp_path / "x.nii", img), spec)
    lo, hi = (0 - spec.mean[0]) / spec.std[0], (1 - spec.mean[0]) / spec.std[0]
    assert float(x.min()) == pytest.approx(lo, abs=1e-4) and float(x.max()) == pytest.approx(hi, abs=1e-4)


def test_2d_layout_keeps_orientation(tmp_path):
    img = np.zeros((20, 10, 1))  # X = 20 columns, Y = 10 rows
    img[15:, :, 0] = 100.0  # right side of the patient (high X)
    x = prepare_image(_save(tmp_path / "x.nii", img), make_spec("2d", "xray", [10, 20], HALF))
    assert x.shape == (1, 10, 20)
    assert float(x[0, :, -1].mean()) > float(x[0, :, 0].mean())


def test_25d_slabs_use_mip_for_ct(tmp_path):
    vol = np.full((8, 8, 9), -1000.0)
    vol[4, 4, 7] = 400.0  # one bright voxel in the top slab
    x = prepare_image(_save(tmp_path / "v.nii", vol), make_spec("2.5d", "ct-lung", [8, 8], HALF, slices=3))
    assert x.shape == (3, 8, 8)
    assert float(x[2].max()) > 0.5 and float(x[0].max()) == pytest.approx(-1.0, abs=1e-5)


def test_unknown_preset_is_an_error_not_a_default():
    with pytest.raises(ConfigError, match="did you mean 'ct-lung'"):
        make_spec("2d", "ct_lung", [8, 8], HALF)


def test_volume_into_2d_model_names_file_and_fix(tmp_path):
    path = _save(tmp_path / "v.nii", np.zeros((8, 8, 5)))
    with pytest.raises(DataError, match=r"v\.nii: a 2D model needs single-slice images.*prepare.dims: 3d"):
        prepare_image(path, make_spec("2d", "xray", [8, 8], HALF))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"missing\.nii"):
        prepare_image(tmp_path / "missing.nii", make_spec("2d", "xray", [8, 8], HALF))


def test_spec_roundtrip_and_hash_changes_with_settings():
    a = make_spec("2d", "xray", [224, 224], HALF)
    assert spec_from_dict(a.as_dict()) == a
    assert a.hash() != make_spec("2d", "xray", [256, 256], HALF).hash()
    assert a.hash() != make_spec("2d", "xray", [224, 224], IMAGENET).hash()


def test_cache_hit_skips_decoding_and_is_keyed_by_spec(tmp_path):
    path = _save(tmp_path / "x.nii", np.random.default_rng(0).random((32, 32, 1)) * 100)
    spec = make_spec("2d", "xray", [16, 16], HALF)
    ds = PreparedDataset([path], ["abc"], [1], spec, cache_dir=tmp_path / "cache")
    first, y, _ = ds[0]
    assert ds.hits == 0 and cache_path(tmp_path / "cache", spec, "abc").exists()
    Path(path).unlink()  # a hit must not touch the image again
    second, _, _ = ds[0]
    assert ds.hits == 1 and torch.equal(first, second) and y == 1
    other = PreparedDataset([path], ["abc"], [1], make_spec("2d", "xray", [8, 8], HALF), tmp_path / "cache")
    with pytest.raises(DataError):  # a changed spec misses the cache (and the file is gone)
        other[0]


def test_augmentation_is_seeded_and_changes_the_image():
    x = torch.rand(1, 32, 32)
    a = build_augment("2d", flip=True, rotate_deg=10, scale=0.1, intensity=0.1, seed=3)
    b = build_augment("2d", flip=True, rotate_deg=10, scale=0.1, intensity=0.1, seed=3)
    ya, yb = a(x), b(x)
    assert torch.allclose(torch.as_tensor(ya), torch.as_tensor(yb))
    assert not torch.allclose(torch.as_tensor(ya), x)
