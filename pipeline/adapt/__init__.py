"""Adapt ImageNet CNNs to 1-channel 2D, 2.5D (slices as channels or slicewise) and inflated 3D inputs."""

from pipeline.adapt.backbones import POOLS, Features, MedNet, build_model, layer_groups
from pipeline.adapt.channels import adapt_first_conv, fold_rgb_weight
from pipeline.adapt.inflate import INFLATIONS, inflate_conv_weight, inflate_to_3d
from pipeline.adapt.package import CalibratedNet, parse_record, read_package, write_package
from pipeline.adapt.registry import (
    BACKBONES,
    DIMS,
    BackboneSpec,
    backbone_preprocessing,
    densenet_new_keys,
    get_spec,
    load_state_dict_file,
    lukemelas_to_timm,
    resolve_weights,
    sha256_file,
    weight_dirs,
)
from pipeline.adapt.transfusion import transfuse

__all__ = [
    "BACKBONES",
    "DIMS",
    "INFLATIONS",
    "POOLS",
    "BackboneSpec",
    "CalibratedNet",
    "Features",
    "MedNet",
    "adapt_first_conv",
    "backbone_preprocessing",
    "build_model",
    "densenet_new_keys",
    "fold_rgb_weight",
    "get_spec",
    "inflate_conv_weight",
    "inflate_to_3d",
    "layer_groups",
    "load_state_dict_file",
    "lukemelas_to_timm",
    "parse_record",
    "read_package",
    "resolve_weights",
    "sha256_file",
    "transfuse",
    "weight_dirs",
    "write_package",
]
