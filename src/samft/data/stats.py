"""Dataset statistics: counts, shapes, spacings, HU percentiles, lesion volumes, foreground intensities.

Statistics are built in two steps so that a volume is read once: ``case_summary`` condenses one read
image and mask (the pre-flight check calls it while it has them in memory), ``summarize_cases`` turns the
summaries into a JSON-serialisable dict. Intensities are sampled (``SAMPLES_PER_CASE`` random voxels of
the volume, as many from inside the mask), the way nnU-Net gathers its foreground intensity properties;
its CT normalisation clips to ``percentile_00_5 .. percentile_99_5`` of the foreground and then
subtracts ``mean`` and divides by ``std``.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from samft.data.readers import Volume, read_volume
from samft.devices import available_cpus
from samft.errors import UserError

SAMPLES_PER_CASE = 10_000
HU_PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)


def voxel_spacing(affine: np.ndarray) -> list[float]:
    """Voxel size in mm along each array axis (the lengths of the affine's first three columns)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0).tolist()


def case_summary(record: dict, image: Volume, mask: Volume | None) -> dict:
    """Condense one case: shape, spacing, lesion size and intensity samples (float32 arrays, not JSON)."""
    rng = np.random.default_rng(zlib.crc32(record["case_id"].encode()))
    array = image.array
    index = tuple(rng.integers(0, size, SAMPLES_PER_CASE) for size in array.shape)
    summary = {
        "case_id": record["case_id"],
        "patient_id": record["patient_id"],
        "ich": int(record["ich"]),
        "shape": list(array.shape),
        "spacing": voxel_spacing((mask if mask is not None and not image.has_geometry else image).affine),
        "lesion_voxels": 0,
        "lesion_ml": 0.0,
        "intensity_sample": array[index].astype(np.float32),
        "foreground_sample": np.empty(0, np.float32),
    }
    if mask is not None:
        foreground = np.nonzero(mask.array)
        count = foreground[0].size
        voxel_mm3 = abs(np.linalg.det(mask.affine[:3, :3]))
        summary["lesion_voxels"] = int(count)
        summary["lesion_ml"] = float(count * voxel_mm3 / 1000.0)
        if count:
            pick = rng.choice(count, size=min(count, SAMPLES_PER_CASE), replace=False)
            summary["foreground_sample"] = array[tuple(axis[pick] for axis in foreground)].astype(np.float32)
    return summary


def summarize_cases(cases: list[dict]) -> dict:
    """Aggregate ``case_summary`` dicts into JSON-serialisable statistics (see ``dataset_stats``)."""
    if not cases:
        raise UserError("no samples to compute dataset statistics from")
    positives = [c for c in cases if c["ich"]]
    shapes = np.array([c["shape"] for c in cases], dtype=np.float64)
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    intensities = np.concatenate([c["intensity_sample"] for c in cases]).astype(np.float64)
    foreground = np.concatenate([c["foreground_sample"] for c in cases]).astype(np.float64)
    lesions = np.array([c["lesion_ml"] for c in positives], dtype=np.float64)
    return {
        "n_samples": len(cases),
        "n_patients": len({c["patient_id"] for c in cases}),
        "n_positive": len(positives),
        "n_negative": len(cases) - len(positives),
        "positive_ratio": len(positives) / len(cases),
        "shape": _spread(shapes),
        "spacing_mm": _spread(spacings),
        "hu_percentiles": {
            f"p{q:g}": float(v) for q, v in zip(HU_PERCENTILES, np.percentile(intensities, HU_PERCENTILES))
        },
        "lesion_volume_ml": _lesions(lesions),
        "foreground_intensity": _foreground(foreground),
        "cases": [
            {k: c[k] for k in ("case_id", "ich", "shape", "spacing", "lesion_ml")} for c in cases
        ],
    }


def dataset_stats(records: list[dict], *, workers: int | None = None) -> dict:
    """Statistics of the given records (typically the training split), reading each volume once.

    Returns a JSON-serialisable dict: ``n_samples``, ``n_patients``, ``n_positive``, ``n_negative``,
    ``positive_ratio``, ``shape`` and ``spacing_mm`` (``min``/``median``/``max`` per axis),
    ``hu_percentiles`` (``p0.5`` ... ``p99.5`` of sampled voxels), ``lesion_volume_ml`` over positive cases
    (``count``/``min``/``median``/``mean``/``max``, None without positives), ``foreground_intensity``
    (nnU-Net's ``mean``/``median``/``std``/``min``/``max``/``percentile_00_5``/``percentile_99_5`` of
    voxels inside the masks, None without foreground) and per-case ``cases``.
    Raises UserError for an unreadable file (run the pre-flight check first).
    """

    def summarize(record: dict) -> dict:
        image = read_volume(record["image"])
        mask = read_volume(record["label"]) if record["label"] is not None else None
        return case_summary(record, image, mask)

    with ThreadPoolExecutor(max_workers=workers or min(4, available_cpus())) as pool:
        return summarize_cases(list(pool.map(summarize, records)))


def format_stats(stats: dict) -> str:
    """A few human-readable lines for the log."""

    def triple(values: list[float], fmt: str) -> str:
        return " x ".join(format(v, fmt) for v in values)

    hu = stats["hu_percentiles"]
    lines = [
        f"samples {stats['n_samples']} ({stats['n_patients']} patients): {stats['n_positive']} with hemorrhage, "
        f"{stats['n_negative']} without (positive ratio {stats['positive_ratio']:.2f})",
        f"shape    min {triple(stats['shape']['min'], '.0f')}  median {triple(stats['shape']['median'], '.0f')}"
        f"  max {triple(stats['shape']['max'], '.0f')}",
        f"spacing  min {triple(stats['spacing_mm']['min'], '.2f')}  median "
        f"{triple(stats['spacing_mm']['median'], '.2f')}  max {triple(stats['spacing_mm']['max'], '.2f')} mm",
        "HU       " + "  ".join(f"{k} {v:.0f}" for k, v in hu.items()),
    ]
    lesions = stats["lesion_volume_ml"]
    if lesions is None:
        lines.append("lesions  none (no positive samples)")
    else:
        lines.append(
            f"lesions  {lesions['count']}: min {lesions['min']:.2f}  median {lesions['median']:.2f}  "
            f"mean {lesions['mean']:.2f}  max {lesions['max']:.2f} ml"
        )
    fg = stats["foreground_intensity"]
    if fg is None:
        lines.append("foreground intensity  none (no mask voxels)")
    else:
        lines.append(
            f"foreground intensity  mean {fg['mean']:.1f}  std {fg['std']:.1f}  "
            f"p0.5 {fg['percentile_00_5']:.1f}  p99.5 {fg['percentile_99_5']:.1f} HU"
        )
    return "\n".join(lines)


def _spread(values: np.ndarray) -> dict:
    return {
        "min": values.min(axis=0).tolist(),
        "median": np.median(values, axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
    }


def _lesions(volumes: np.ndarray) -> dict | None:
    if volumes.size == 0:
        return None
    return {
        "count": int(volumes.size),
        "min": float(volumes.min()),
        "median": float(np.median(volumes)),
        "mean": float(volumes.mean()),
        "max": float(volumes.max()),
    }


def _foreground(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    low, high = np.percentile(values, [0.5, 99.5])
    return {
        "n_voxels": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "percentile_00_5": float(low),
        "percentile_99_5": float(high),
    }
