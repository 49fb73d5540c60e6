"""Write a prediction on a DICOM CT series as a DICOM Segmentation (highdicom), so that viewers and PACS
(3D Slicer, OHIF, ...) overlay it on the series it was computed from.

One segment, "Intracranial hemorrhage" (SNOMED CT 1386000, category 49755003 "Morphologically abnormal
structure"), computed by an automatic algorithm identified as samft with its version and the checkpoint's file
name. Each frame references the source slice it lies on; the SEG joins the source study and frame of reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samft import __version__
from samft.data.dicom import scan_series
from samft.errors import UserError

SEGMENT_LABEL = "Intracranial hemorrhage"
SERIES_DESCRIPTION = "samft ICH segmentation"
SERIES_NUMBER_OFFSET = 1000
"""The SEG's SeriesNumber is the source's plus this, so viewers list it after the source series."""
GRID_ATOL_MM = 1e-3


def write_segmentation(
    *,
    series_folder: Path,
    mask: np.ndarray,
    affine: np.ndarray,
    output: Path,
    checkpoint: Path,
    fractional: bool = False,
) -> Path:
    """Write ``mask`` (X x Y x Z on the series' grid: columns x rows x slices in position order) as a SEG.

    ``fractional=False``: a binary mask ({0, 1}); ``True``: probabilities in [0, 1] stored as a FRACTIONAL
    (PROBABILITY) SEG with 255 levels. ``affine`` must be the series' own (4 x 4 RAS), which makes sure the
    frames land on the slices they reference. Returns ``output``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series = scan_series(series_folder)
    if mask.shape != series.shape or not np.allclose(affine, series.affine, atol=GRID_ATOL_MM):
        raise UserError(
            f"{series_folder}: the prediction {mask.shape} is not on the series' grid {series.shape}; "
            "a DICOM SEG needs the mask on the source slices"
        )
    source = series.datasets[0]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="samft", family=codes.cid7162.ArtificialIntelligence, version=__version__, source="samft",
        parameters={"checkpoint": checkpoint.name},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.IntracranialHemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0))  # slices x rows x columns, one frame per source slice
    if fractional:
        frames = frames.clip(0.0, 1.0).astype(np.float32)
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        frames = (frames > 0).astype(np.uint8)
        kind = hd.seg.SegmentationTypeValues.BINARY
    seg = hd.seg.Segmentation(
        source_images=list(series.datasets),
        pixel_array=frames,
        segmentation_type=kind,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=int(source.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="samft",
        manufacturer_model_name="samft",
        software_versions=__version__,
        device_serial_number="none",
        content_description=f"ICH probability ({checkpoint.name})" if fractional else f"ICH mask ({checkpoint.name})",
        content_creator_name="samft^",
        content_label="SAMFT_ICH",
        omit_empty_frames=bool(frames.any()),  # an all-empty mask keeps its frames (highdicom would warn)
    )
    seg.SeriesDescription = SERIES_DESCRIPTION
    output.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(output)
    return output
