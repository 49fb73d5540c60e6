"""`python -m samft.baseline`: a no-learning threshold segmentation, written the way `samft.predict` writes masks.

Blood-density voxels (`hu_min`-`hu_max` HU) inside the intracranial cavity, components under `min_component_ml`
dropped. The cavity is what the skull encloses: per axial slice, the holes of the bone mask (> `bone_hu` HU),
kept only `erode_mm` or more from its edge so that the partial volume of bone at the skull's inner surface is
not taken for blood. Score it with `python -m samft.evaluate pred_dir=<output> ...` like any other tool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import MISSING, DictConfig

from samft.choices import SCAN_TOOL_CHOICES, SCAN_TOOL_RANGES
from samft.cli import exit_on_user_error, run_entry
from samft.config import ScanToolConfig, validate_tool
from samft.errors import UserError
from samft.predict import checked_entry

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("samft.baseline")


@dataclass
class BaselineConfig(ScanToolConfig):
    """`conf/baseline.yaml`'s keys (see there)."""

    input: str = MISSING
    output: str = MISSING
    hu_min: float = 55.0
    hu_max: float = 100.0
    min_component_ml: float = 0.1
    bone_hu: float = 300.0
    erode_mm: float = 3.0


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the scanner's head-foot (world z) direction: the one axial slices are cut along."""
    import numpy as np

    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def intracranial_cavity(hu: np.ndarray, affine: np.ndarray, *, bone_hu: float, erode_mm: float) -> np.ndarray:
    """bool X x Y x Z: voxels enclosed by bone (> `bone_hu`) in their axial slice, at least `erode_mm` mm
    (3-D, on the voxel spacing of `affine`) from anything outside that enclosure."""
    import numpy as np
    from scipy import ndimage

    from samft.data.stats import voxel_spacing

    bone = np.asarray(hu) > bone_hu
    axis = axial_axis(affine)
    enclosed = np.moveaxis(np.zeros_like(bone), axis, 0)
    for index, plane in enumerate(np.moveaxis(bone, axis, 0)):
        enclosed[index] = ndimage.binary_fill_holes(plane) & ~plane
    enclosed = np.moveaxis(enclosed, 0, axis)
    if erode_mm <= 0:
        return enclosed
    return ndimage.distance_transform_edt(enclosed, sampling=voxel_spacing(affine)) > erode_mm


def threshold_mask(
    hu: np.ndarray, affine: np.ndarray, *, hu_min: float, hu_max: float, min_component_ml: float, bone_hu: float,
    erode_mm: float,
) -> np.ndarray:
    """uint8 X x Y x Z: `hu_min` <= HU <= `hu_max` inside the intracranial cavity, in 26-connected components of
    at least `min_component_ml` ml."""
    import numpy as np
    from scipy import ndimage

    hu = np.asarray(hu, dtype=np.float32)
    candidate = (hu >= hu_min) & (hu <= hu_max) & intracranial_cavity(hu, affine, bone_hu=bone_hu, erode_mm=erode_mm)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return candidate.astype(np.uint8)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    sizes_ml = np.bincount(labels.ravel()) * voxel_ml
    keep = sizes_ml >= min_component_ml
    keep[0] = False
    return keep[labels].astype(np.uint8)


def check_settings(cfg: DictConfig) -> None:
    """One UserError naming the key for thresholds that cannot work."""
    if not cfg.hu_min < cfg.hu_max:
        raise UserError(f"hu_min={cfg.hu_min} must be below hu_max={cfg.hu_max} (blood is about 55-100 HU)")
    if cfg.min_component_ml < 0 or cfg.erode_mm < 0:
        raise UserError(f"min_component_ml={cfg.min_component_ml} and erode_mm={cfg.erode_mm} must be >= 0")
    if cfg.bone_hu <= cfg.hu_max:
        raise UserError(f"bone_hu={cfg.bone_hu} must be above hu_max={cfg.hu_max}, or blood counts as skull")


def run_baseline(cfg: DictConfig) -> list[str]:
    """Write one mask per input scan in samft.predict's naming; returns one failure line per unreadable scan."""
    from samft.predict import plan_jobs

    cfg = validate_tool(cfg, BaselineConfig, tool="baseline", choices=SCAN_TOOL_CHOICES, ranges=SCAN_TOOL_RANGES)
    check_settings(cfg)
    jobs = plan_jobs(source=Path(cfg.input), output=Path(cfg.output), points_file=None, probabilities=False)

    import nibabel as nib  # after the checks above: a mistyped input fails before torch and MONAI load
    import numpy as np
    from tqdm import tqdm

    from samft.data.readers import read_volume
    from samft.inference import declared_geometry, finite_voxels
    from samft.predict import write_atomically

    failures, without_geometry = [], []
    for job in tqdm(jobs, desc="baseline", unit="scan"):
        try:
            declared = declared_geometry(job.image)
            voxels = int(np.prod(declared[0])) if declared is not None else 0
            if voxels > cfg.max_voxels:  # before the voxels are read: a small .nii.gz may decompress to many GB
                raise UserError(f"{voxels:,} voxels exceed max_voxels={cfg.max_voxels:,}; check the file, or "
                                "raise max_voxels if it is real")
            volume = read_volume(job.image)
            hu = finite_voxels(volume.array, job.image, policy=cfg.nonfinite)
            mask = threshold_mask(hu, volume.affine, hu_min=cfg.hu_min, hu_max=cfg.hu_max,
                                  min_component_ml=cfg.min_component_ml, bone_hu=cfg.bone_hu, erode_mm=cfg.erode_mm)
            write_atomically(job.mask_out, lambda tmp, m=mask, a=volume.affine: nib.save(nib.Nifti1Image(m, a), tmp))
        except UserError as err:
            failures.append(f"{job.image}: {err}")
            log.error("%s: %s", job.image, err)
            continue
        except OSError as err:
            failures.append(f"{job.image}: cannot write {job.mask_out} ({err.strerror or err})")
            log.error("%s: cannot write %s (%s)", job.image, job.mask_out, err)
            continue
        if not volume.has_geometry:
            without_geometry.append(job.image.name)
        log.info("%s -> %s", job.image, job.mask_out)
    if without_geometry:
        log.warning("%d scan(s) carry no spacing (bare .pkl arrays, e.g. %s): 1 mm voxels assumed for erode_mm "
                    "and min_component_ml", len(without_geometry), without_geometry[0])
    return failures


@hydra.main(config_path="../../conf", config_name="baseline", version_base="1.3")
def _hydra_baseline(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: _baseline_all(cfg))


def _baseline_all(cfg: DictConfig) -> None:
    failures = run_baseline(cfg)
    if failures:
        raise UserError(f"{len(failures)} scan(s) failed: " + " | ".join(failures))


def main() -> None:
    run_entry(checked_entry(_hydra_baseline, BaselineConfig, tool="baseline"))


if __name__ == "__main__":
    main()
