"""SAM-Med3D for hemorrhage segmentation: the network, its heads, click simulation and builders."""

from samft.model.build import (
    REGISTRY,
    RELEASED_CHECKPOINT_URL,
    SamMed3DSpec,
    build_model,
    build_model_from_config,
    build_sam,
    load_weights,
    param_groups,
    read_state_dict,
)
from samft.model.prompts import correction_click, first_click, sample_voxels
from samft.model.sam3d import SamMed3D, SegmentOutput

__all__ = [
    "REGISTRY",
    "RELEASED_CHECKPOINT_URL",
    "SamMed3D",
    "SamMed3DSpec",
    "SegmentOutput",
    "build_model",
    "build_model_from_config",
    "build_sam",
    "correction_click",
    "first_click",
    "load_weights",
    "param_groups",
    "read_state_dict",
    "sample_voxels",
]
