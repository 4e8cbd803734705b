"""Prepare stage: MONAI chains per preset with known answers, layouts per dims, and the cache."""

import re
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


# --- no silent fallbacks: unknown presets and interpolations, untrusted spec metadata ---------------


def test_an_unknown_preset_in_a_spec_is_an_error_not_the_xray_chain(tmp_path):
    from pipeline.records import PrepareSpec

    spec = PrepareSpec(dims="2d", preset="ct_lung", size=(8, 8))  # e.g. built by hand or from old metadata
    with pytest.raises(ConfigError, match=r"unknown preset 'ct_lung' \(did you mean 'ct-lung'\?\).*'xray'"):
        prepare_image(_save(tmp_path / "x.nii", np.ones((8, 8, 1))), spec)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_2d_resize_uses_the_specs_interpolation(tmp_path, interpolation, monkeypatch):
    import pipeline.prepare as prepare

    modes = []
    real = prepare.Resize

    def spy(*args, **kw):
        modes.append(kw.get("mode"))
        return real(*args, **kw)

    monkeypatch.setattr(prepare, "Resize", spy)
    img = np.random.default_rng(0).random((12, 12, 1)) * 100
    spec = make_spec("2d", "xray", [8, 8], {**HALF, "interpolation": interpolation})
    assert spec.interpolation == interpolation
    prepare_image(_save(tmp_path / "x.nii", img), spec)
    assert modes == [interpolation]


def test_an_unknown_interpolation_is_an_error_not_bilinear(tmp_path):
    from pipeline.records import PrepareSpec

    with pytest.raises(ConfigError, match=r"unknown 'bicubc' \(did you mean 'bicubic'\?\)"):
        make_spec("2d", "xray", [8, 8], {**HALF, "interpolation": "bicubc"})
    spec = PrepareSpec(dims="2d", preset="xray", size=(8, 8), interpolation="lanczos")
    with pytest.raises(ConfigError, match=r"unknown 'lanczos'.*\['bilinear', 'bicubic'\]"):
        prepare_image(_save(tmp_path / "x.nii", np.ones((8, 8, 1))), spec)


def test_spec_from_dict_lists_every_problem_of_untrusted_metadata():
    bad = {
        "dims": "3d",
        "preset": "ct_lung",
        "size": [64, 0],
        "slices": 0,
        "reduce": "mip",
        "interpolation": "bicubc",
        "colour": "red",
    }
    with pytest.raises(DataError) as err:
        spec_from_dict(bad)
    text = str(err.value)
    for needle in (
        "the model's prepare metadata is invalid",
        "unknown key 'colour'",
        "preset: unknown 'ct_lung' (did you mean 'ct-lung'?)",
        "reduce: 'mip' needs dims 2d, got 3d",
        "interpolation: 'bicubc'",
        "size: dims 3d needs 3 values, got [64, 0]",
        "size: every value must be ≥ 1",
        "slices: must be an integer ≥ 1, got 0",
        "re-package the model",
    ):
        assert needle in text, needle
    with pytest.raises(DataError) as err:
        spec_from_dict({"dim": "2d", "size": [8, 8]})
    text = str(err.value)
    assert "unknown key 'dim' (did you mean 'dims'?)" in text
    assert "missing required key 'dims'" in text and "missing required key 'preset'" in text
    for wrong, needle in (
        ({"dims": "2.5"}, "dims: '2.5' is not one of"),
        ({"reduce": "maxip"}, "did you mean 'mip'"),
        ({"size": [8, 8, 8]}, "dims 2d needs 2 values"),
        ({"size": "224"}, "size: must be a list of integers"),
        ({"std": [0.0]}, "std: every value must be > 0"),
    ):
        with pytest.raises(DataError, match=re.escape(needle)):
            spec_from_dict({**make_spec("2d", "xray", [8, 8], HALF).as_dict(), **wrong})


def test_spec_from_dict_keeps_valid_and_older_specs_and_their_hash():
    for spec in (
        make_spec("2d", "ct-lung", [64, 64], HALF, reduce="center"),
        make_spec("2.5d", "ct-bone", [32, 32], IMAGENET, slices=5, spacing=[1.0, 1.0, 2.5]),
        make_spec("3d", "mr", [8, 16, 16], {**HALF, "interpolation": "bilinear"}),
    ):
        assert spec_from_dict(spec.as_dict()) == spec and spec_from_dict(spec.as_dict()).hash() == spec.hash()
    old = {k: v for k, v in make_spec("2d", "ct-lung", [64, 64], HALF).as_dict().items() if k != "reduce"}
    assert spec_from_dict(old).hash() == "50142b0748ca07be"  # written before `reduce` existed
