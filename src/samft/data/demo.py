"""Procedural brain-CT phantom written in the users' real format: CSVs, `.pkl` HU volumes, NIfTI masks.

A data set folder holds `train.csv` and `val.csv` (columns `path,ich,patient_id`, paths relative to the
CSV's folder), `volumes/{stem}.pkl` (a dict {"image": int16 HU array X x Y x Z, "affine": 4 x 4}) and
`masks/{stem}.nii.gz` (uint8 {0,1}, same shape and affine). The split is by patient; each patient has
several scans (same anatomy, new pose, noise and bleeds). About a third of the scans have no bleed; the
others have 1-3 lumpy bleeds of 50-90 HU inside the parenchyma, small ones (< 1 ml) included.
Everything is drawn from `numpy.random.SeedSequence([seed, patient, scan])`: same seed, same bytes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from samft.errors import UserError

log = logging.getLogger("samft.data")

GENERATOR_VERSION = 1
DEFAULT_SHAPE = (208, 208, 32)
DEFAULT_SPACING = (0.9, 0.9, 5.0)
AIR_HU = -1024
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Phantom:
    """One scan: `image` int16 HU X x Y x Z, `mask` uint8 X x Y x Z in {0,1}, `affine` 4 x 4 (voxel -> RAS mm)."""

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    @property
    def lesion_ml(self) -> float:
        voxel_ml = abs(np.linalg.det(self.affine[:3, :3])) / 1000.0
        return float(self.mask.sum() * voxel_ml)


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient head geometry in mm (skin ellipsoid semi-axes LR, AP, SI) and tissue settings."""

    axes: tuple[float, float, float]
    scalp: float
    skull: float
    csf: float
    ventricle_scale: float
    tilt_deg: float
    grey_hu: float
    white_hu: float


def default_demo_dir(*, seed: int, n_patients: int) -> Path:
    """The cache folder used when `data.demo_dir` is not set: $XDG_CACHE_HOME/samft/demo-<seed>-<n>."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "samft" / f"demo-{seed}-{n_patients}"


def ensure_demo_dataset(
    *, root: Path, n_patients: int, seed: int, volumes_per_patient: int = 2
) -> tuple[Path, Path, Path]:
    """Return (train_csv, val_csv, mask_dir) of the demo set in `root`, generating it on first use.

    Generation goes to a temporary sibling folder that is renamed into place when complete, so an
    interrupted run never leaves a half data set; a folder made for other settings is regenerated.
    """
    root = Path(root).expanduser()
    wanted = _manifest(n_patients=n_patients, seed=seed, volumes_per_patient=volumes_per_patient)
    if _read_manifest(root) == wanted:
        return _outputs(root)
    if root.exists() and any(root.iterdir()) and _read_manifest(root) is None:
        raise UserError(
            f"data.demo_dir {root} exists and is not a samft demo data set; point data.demo_dir at a new folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the demo data set (%d patients, seed %d) into %s", n_patients, seed, root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        write_demo_dataset(tmp, n_patients=n_patients, seed=seed, volumes_per_patient=volumes_per_patient)
        (tmp / MANIFEST).write_text(json.dumps(wanted, indent=2) + "\n")
        _move_into_place(tmp, root, wanted=wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if _read_manifest(root) != wanted:  # another process replaced it in between: should not happen
        raise UserError(f"the demo data set in {root} changed while it was written; delete the folder and rerun")
    return _outputs(root)


def write_demo_dataset(
    root: Path,
    *,
    n_patients: int,
    seed: int,
    volumes_per_patient: int = 2,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> tuple[Path, Path, Path]:
    """Write a demo data set into `root` (created if needed); returns (train_csv, val_csv, mask_dir)."""
    if n_patients < 2:
        raise UserError(f"data.demo_patients is {n_patients}; the patient-level split needs at least 2")
    root = Path(root)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    plan = _plan(n_patients=n_patients, seed=seed, volumes_per_patient=volumes_per_patient)
    rows: dict[str, list[tuple[str, int, str]]] = {"train": [], "val": []}
    small_turn = 0
    for index, (split, patient, scan, ich) in enumerate(plan):
        stem = f"{index:03d}"
        rng = np.random.default_rng(np.random.SeedSequence([seed, patient, scan]))
        anatomy = _patient_anatomy(np.random.default_rng(np.random.SeedSequence([seed, patient])))
        n_bleeds = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])) if ich else 0
        force_small = bool(ich) and small_turn % 3 == 0
        small_turn += int(bool(ich))
        phantom = make_phantom(
            rng, anatomy=anatomy, shape=shape, spacing=spacing, n_bleeds=n_bleeds, force_small=force_small
        )
        with open(root / "volumes" / f"{stem}.pkl", "wb") as f:
            pickle.dump({"image": phantom.image, "affine": phantom.affine}, f, protocol=4)
        nib.save(nib.Nifti1Image(phantom.mask, phantom.affine), root / "masks" / f"{stem}.nii.gz")
        rows[split].append((f"volumes/{stem}.pkl", ich, f"P{patient:03d}"))
    for split, split_rows in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "ich", "patient_id"])
            writer.writerows(split_rows)
    return _outputs(root)


def make_phantom(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    n_bleeds: int = 1,
    force_small: bool = False,
    anatomy: _Anatomy | None = None,
) -> Phantom:
    """One head CT with `n_bleeds` bleeds (0 = a negative scan); `force_small` makes the first one < 1 ml."""
    anatomy = anatomy or _patient_anatomy(rng)
    affine = _scanner_affine(rng, shape=shape, spacing=spacing, tilt_deg=anatomy.tilt_deg)
    q = _head_coordinates(rng, affine, shape)
    hu, parenchyma = _render_head(rng, q, anatomy)
    mask = np.zeros(shape, dtype=bool)
    for i in range(n_bleeds):
        mask |= _add_bleed(rng, hu, q, parenchyma, small=force_small and i == 0, voxel_mm3=_voxel_mm3(affine))
    hu += _scanner_noise(rng, shape, sigma=float(rng.uniform(4.0, 7.0)))
    inside_fov = _circular_fov(shape)
    hu[~inside_fov] = AIR_HU
    image = np.clip(np.rint(hu), AIR_HU, 3071).astype(np.int16)
    return Phantom(image=image, mask=mask.astype(np.uint8), affine=affine)


def _plan(*, n_patients: int, seed: int, volumes_per_patient: int) -> list[tuple[str, int, int, int]]:
    """(split, patient, scan, ich) per volume: a quarter of the patients for validation and, within each
    split, a third of the scans negative (at least one per split when the split has two or more scans)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1]))
    n_val = max(1, round(n_patients / 4))
    val_patients = set(rng.permutation(n_patients)[:n_val].tolist())
    plan = []
    for split in ("train", "val"):
        scans = [(p, s) for p in range(n_patients) if (p in val_patients) == (split == "val")
                 for s in range(volumes_per_patient)]
        n_neg = max(1, round(len(scans) / 3)) if len(scans) >= 2 else 0
        negatives = set(rng.choice(len(scans), size=n_neg, replace=False).tolist())
        plan += [(split, p, s, int(i not in negatives)) for i, (p, s) in enumerate(scans)]
    return plan


def _patient_anatomy(rng: np.random.Generator) -> _Anatomy:
    return _Anatomy(
        axes=(rng.uniform(66, 72), rng.uniform(82, 89), rng.uniform(74, 80)),
        scalp=rng.uniform(3.0, 5.0),
        skull=rng.uniform(5.5, 8.0),
        csf=rng.uniform(1.0, 2.5),
        ventricle_scale=rng.uniform(0.8, 1.3),
        tilt_deg=float(rng.choice([0.0, rng.uniform(8.0, 20.0)])),
        grey_hu=rng.uniform(36.0, 40.0),
        white_hu=rng.uniform(29.0, 32.0),
    )


def _scanner_affine(
    rng: np.random.Generator, *, shape: tuple[int, int, int], spacing: tuple[float, float, float], tilt_deg: float
) -> np.ndarray:
    """LPS-stored axes (as DICOM converters write them: orientation code L,P,S) with an optional gantry
    tilt about the left-right axis, centred near the world origin."""
    t = np.deg2rad(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    linear = tilt @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    centre = (np.array(shape) - 1) / 2.0
    offset = np.array([0.0, 0.0, 15.0]) + rng.uniform(-3.0, 3.0, size=3)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset - linear @ centre
    return affine


def _head_coordinates(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Head-frame coordinates in mm (3 x X x Y x Z; axes LR, AP, SI) of every voxel, with a small pose jitter."""
    yaw, roll, pitch = np.deg2rad(rng.uniform(-6, 6, size=3))
    rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    ry = np.array([[np.cos(roll), 0, np.sin(roll)], [0, 1, 0], [-np.sin(roll), 0, np.cos(roll)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    pose = rz @ ry @ rx
    to_head = pose.T @ affine[:3, :3]
    shift = pose.T @ (affine[:3, 3] - rng.uniform(-3.0, 3.0, size=3))
    idx = np.indices(shape, dtype=np.float32)
    return (np.tensordot(to_head.astype(np.float32), idx, axes=1) + shift.astype(np.float32)[:, None, None, None])


def _ellipsoid_depth(q: np.ndarray, axes: tuple[float, float, float]) -> np.ndarray:
    """Approximate depth in mm below the surface of the ellipsoid with semi-axes `axes` (negative outside)."""
    a = np.asarray(axes, dtype=np.float32)[:, None, None, None]
    rho = np.sqrt(np.sum((q / a) ** 2, axis=0))
    grad = np.sqrt(np.sum((q / a**2) ** 2, axis=0)) / np.maximum(rho, 1e-6)
    return (1.0 - rho) / np.maximum(grad, 1e-6)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean unit-variance low-frequency noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _render_head(rng: np.random.Generator, q: np.ndarray, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (float32) and the parenchyma mask (bool) of one head."""
    shape = q.shape[1:]
    depth = _ellipsoid_depth(q, anatomy.axes)
    texture = _smooth_field(rng, shape, sigma=2.0)
    skull_end = anatomy.scalp + anatomy.skull * (1.0 + 0.1 * texture)
    brain_start = skull_end + anatomy.csf
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[depth > 0] = 35.0  # scalp
    in_skull = (depth > anatomy.scalp) & (depth <= skull_end)
    t = (depth - anatomy.scalp) / np.maximum(skull_end - anatomy.scalp, 1e-3)
    hu[in_skull] = (1250.0 - 600.0 * np.exp(-(((t - 0.5) / 0.22) ** 2)))[in_skull]  # tables and diploe
    hu[(depth > skull_end) & (depth <= brain_start)] = 8.0  # subarachnoid CSF
    brain = depth > brain_start
    cortex = depth - brain_start < 3.0 + 1.0 * texture
    hu[brain] = np.where(cortex, anatomy.grey_hu, anatomy.white_hu)[brain] + 1.5 * texture[brain]
    u, v, w = q
    s = anatomy.ventricle_scale
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):  # lateral ventricles, frontal horns diverging
        a = np.deg2rad(12.0) * side
        du, dv = u - side * 7.0 * s, v - 4.0
        ru, rv = du * np.cos(a) + dv * np.sin(a), -du * np.sin(a) + dv * np.cos(a)
        ventricles |= (ru / (4.5 * s)) ** 2 + (rv / (21.0 * s)) ** 2 + ((w - 12.0) / (8.0 * s)) ** 2 < 1.0
    ventricles |= (u / 1.5) ** 2 + ((v + 2.0) / 11.0) ** 2 + ((w + 2.0) / (7.0 * s)) ** 2 < 1.0  # third
    ventricles |= (u / 4.0) ** 2 + ((v + 30.0) / 3.0) ** 2 + ((w + 32.0) / 5.0) ** 2 < 1.0  # fourth
    fissure = (np.abs(u) < 1.0) & (depth - brain_start < 30.0) & (w > -20.0)
    csf = brain & (ventricles | fissure)
    hu[csf] = 5.0
    return hu, brain & ~csf


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _add_bleed(
    rng: np.random.Generator,
    hu: np.ndarray,
    q: np.ndarray,
    parenchyma: np.ndarray,
    *,
    small: bool,
    voxel_mm3: float,
) -> np.ndarray:
    """Blend one lumpy bleed into `hu` (in place) and return its mask (inside the parenchyma only)."""
    target_ml = float(np.exp(rng.uniform(np.log(0.2), np.log(0.9)))) if small else float(
        np.exp(rng.uniform(np.log(1.5), np.log(30.0)))
    )
    candidates = np.flatnonzero(parenchyma)
    for attempt in range(20):
        centre = q.reshape(3, -1)[:, candidates[rng.integers(len(candidates))]]
        radius = (3.0 * target_ml * 1000.0 / (4.0 * np.pi)) ** (1 / 3) * 1.15**attempt
        ratios = rng.uniform(0.65, 1.5, size=3)
        axes = radius * ratios / np.prod(ratios) ** (1 / 3)
        reach = 2.0 * axes.max()
        near = np.flatnonzero(np.all(np.abs(q.reshape(3, -1) - centre[:, None]) < reach, axis=0))
        local = _random_rotation(rng).T @ (q.reshape(3, -1)[:, near] - centre[:, None])
        rho = np.linalg.norm(local / axes[:, None], axis=0)
        for _ in range(rng.integers(0, 3)):  # lobes
            direction = rng.standard_normal(3)
            lobe_centre = 0.75 * axes * direction / np.linalg.norm(direction)
            lobe_axes = axes * rng.uniform(0.35, 0.6)
            rho = np.minimum(rho, np.linalg.norm((local - lobe_centre[:, None]) / lobe_axes[:, None], axis=0))
        for _ in range(3):  # surface wobble
            k = rng.standard_normal(3) * 1.5 / radius
            rho = rho * (1.0 + rng.uniform(0.02, 0.08) * np.sin(k @ local + rng.uniform(0, 2 * np.pi)))
        inside = parenchyma.reshape(-1)[near]
        lesion = (rho <= 1.0) & inside
        if lesion.sum() * voxel_mm3 >= min(0.1 * target_ml * 1000.0, 3 * voxel_mm3) and lesion.any():
            break
    weight = np.clip(0.5 + (1.0 - rho) * radius / 1.5, 0.0, 1.0) * inside  # partial-volume edge
    edema = np.clip((1.35 - rho) / 0.35, 0.0, 1.0) * (rho > 1.0) * inside * (target_ml > 5.0)
    blood = rng.uniform(50.0, 90.0) + 3.0 * rng.standard_normal(len(near))
    flat = hu.reshape(-1)
    flat[near] = (flat[near] - 8.0 * edema) * (1.0 - weight) + blood * weight
    mask = np.zeros(hu.size, dtype=bool)
    mask[near[lesion]] = True
    return mask.reshape(hu.shape)


def _scanner_noise(rng: np.random.Generator, shape: tuple[int, int, int], *, sigma: float) -> np.ndarray:
    """Slightly in-plane-correlated Gaussian noise with standard deviation `sigma` HU."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(0.7, 0.7, 0.0))
    return noise * (sigma / max(float(noise.std()), 1e-6))


def _circular_fov(shape: tuple[int, int, int]) -> np.ndarray:
    i, j = np.ogrid[: shape[0], : shape[1]]
    ci, cj = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    disc = ((i - ci) / (shape[0] / 2.0)) ** 2 + ((j - cj) / (shape[1] / 2.0)) ** 2 <= 1.0
    return np.broadcast_to(disc[:, :, None], shape)


def _voxel_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3])))


def _manifest(*, n_patients: int, seed: int, volumes_per_patient: int) -> dict[str, int]:
    return {"generator_version": GENERATOR_VERSION, "n_patients": n_patients, "seed": seed,
            "volumes_per_patient": volumes_per_patient}


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _outputs(root: Path) -> tuple[Path, Path, Path]:
    return root / "train.csv", root / "val.csv", root / "masks"


def _move_into_place(tmp: Path, root: Path, *, wanted: dict) -> None:
    """Rename the finished `tmp` to `root`, replacing a stale demo set. A concurrent winner (another process that
    finished the same set first, and may be reading it now) is kept, and `tmp` is left for the caller to delete."""
    if _read_manifest(root) == wanted:
        return
    stale = None
    if root.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
        os.rename(root, stale / "old")
    try:
        os.rename(tmp, root)
    except OSError:
        if _read_manifest(root) is None:
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
