"""DICOM CT series in (readers, MONAI loading, CSV sources, pre-flight) and DICOM SEG out (samft.predict).

The series are written here with pydicom the way scanners write them: one file per slice, file names in no
particular order, unsigned stored pixels with ``RescaleIntercept -1024``, oblique orientations.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers.patience import patience
from monai.transforms import LoadImage
from omegaconf import OmegaConf
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

import samft
from samft.data.dicom import read_series, scan_series
from samft.data.preflight import preflight
from samft.data.readers import DicomSeriesReader, image_reader_for, read_volume
from samft.data.sources import csv_records
from samft.data.transforms import LoadCased
from samft.dicom_seg import write_segmentation
from samft.engine.checkpoint import FORMAT, save_checkpoint
from samft.errors import UserError
from samft.model import build_model_from_config
from samft.predict import plan_jobs, run_predictions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CONF = Path(__file__).resolve().parents[1] / "conf"
HEAD_CT = SHARED / "head_ct.nii.gz"
TINY = {"name": "sam_med3d_tiny", "visual_tokens": 32}
DATA = {"spacing": [1.5, 1.5, 1.5], "roi_size": 128, "intensity": "window", "window_center": 40.0,
        "window_width": 80.0}


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    intercepts: list[float] | None = None,
    slope: float = 1.0,
    skip: tuple[int, ...] = (),
    seed: int = 0,
    decimals: int | None = None,
) -> str:
    """Write ``hu`` (X x Y x Z, whole HU) on the RAS ``affine`` as one DICOM file per slice; returns the
    SeriesInstanceUID. Stored pixels are uint16 = (HU - intercept) / slope; file names are shuffled."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing])
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    names = np.random.default_rng(seed).permutation(hu.shape[2])
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    for k in range(hu.shape[2]):
        if k in skip:
            continue
        intercept = -1024.0 if intercepts is None else intercepts[k]
        stored = np.rint((hu[:, :, k].T - intercept) / slope)
        assert stored.min() >= 0 and stored.max() < 2**16
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Head", "ICH001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 3, modality
        ds.SeriesDescription = "Head 5mm"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.InstanceNumber = int(names[k]) + 1  # deliberately not the slice order either
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        position = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [_ds(v if decimals is None else round(v, decimals)) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "HU"
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}_{generate_uid()[-6:]}", enforce_file_format=True)
    return series_uid


def oblique_affine(spacing: tuple[float, float, float], angles_deg: tuple[float, float, float],
                   origin: tuple[float, float, float]) -> np.ndarray:
    """A RAS affine with orthogonal axes rotated about x, y and z."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def synthetic_hu(shape: tuple[int, int, int] = (16, 12, 8), seed: int = 0) -> np.ndarray:
    """Air around a head-like block of tissue with a bright spot: whole HU, int16."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1024, dtype=np.int16)
    hu[2:-2, 2:-2, 1:-1] = rng.integers(0, 80, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    hu[4, 5, 3] = 1500
    return hu


SYNTH_AFFINE = oblique_affine((0.7, 0.8, 2.5), (12.0, -7.0, 20.0), (-40.0, 30.5, 12.25))


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    hu = synthetic_hu()
    write_ct_series(tmp_path / "series", hu, SYNTH_AFFINE)
    return tmp_path / "series", hu, SYNTH_AFFINE


# --- reading -----------------------------------------------------------------------------------------------


def test_oblique_shuffled_series_reads_as_the_nifti_does(series, tmp_path: Path) -> None:
    folder, hu, affine = series
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "same.nii.gz")
    dicom, nifti = read_volume(folder), read_volume(tmp_path / "same.nii.gz")
    np.testing.assert_array_equal(dicom.array, nifti.array)
    assert dicom.array.dtype == np.int16 and dicom.has_geometry
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-3)
    assert nib.aff2axcodes(dicom.affine) == nib.aff2axcodes(affine)


def test_slices_are_ordered_along_the_normal_not_by_name(tmp_path: Path) -> None:
    # the voxel k axis runs against the slice normal here: position order reverses it, the world stays put
    hu = synthetic_hu(seed=1)
    flipped = SYNTH_AFFINE @ np.diag([1.0, 1.0, -1.0, 1.0])
    write_ct_series(tmp_path / "s", hu, flipped, seed=5)
    array, affine = read_series(tmp_path / "s")
    np.testing.assert_array_equal(array, hu[:, :, ::-1])
    last = flipped @ np.array([0, 0, hu.shape[2] - 1, 1.0])
    np.testing.assert_allclose(affine[:3, 3], last[:3], atol=1e-3)
    np.testing.assert_allclose(affine[:3, 2], -flipped[:3, 2], atol=1e-4)


def test_positions_rounded_by_the_scanner_are_not_a_missing_slice(tmp_path: Path) -> None:
    thin = oblique_affine((0.45, 0.45, 0.625), (3.0, -5.0, 8.0), (-100.0, 80.0, -20.0))
    write_ct_series(tmp_path / "s", synthetic_hu((16, 12, 24)), thin, decimals=2)
    np.testing.assert_allclose(read_volume(tmp_path / "s").affine, thin, atol=0.01)


def test_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    hu = synthetic_hu(seed=2)
    intercepts = [-1024.0, -2048.0, -1024.0, -1100.0, -1024.0, -3000.0, -1024.0, -1024.0]
    write_ct_series(tmp_path / "s", hu, SYNTH_AFFINE, intercepts=intercepts)
    np.testing.assert_array_equal(read_volume(tmp_path / "s").array, hu)
    write_ct_series(tmp_path / "half", hu * 2, SYNTH_AFFINE, slope=0.5, intercepts=[-2048.0] * 8)
    halves = read_volume(tmp_path / "half")
    assert halves.array.dtype == np.float32
    np.testing.assert_array_equal(halves.array, hu * 2.0)


def test_monai_reader_gives_the_same_volume_and_geometry(series) -> None:
    folder, hu, affine = series
    reader = image_reader_for(folder)
    assert isinstance(reader, DicomSeriesReader)
    image = LoadImage(image_only=True, ensure_channel_first=True)(folder, reader=reader)
    assert tuple(image.shape) == (1, *hu.shape)
    np.testing.assert_array_equal(image[0].numpy(), hu)
    np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-3)


def test_compressed_series_of_a_real_scanner_slice(tmp_path: Path) -> None:
    """pydicom's CT_small.dcm (a real CT slice, signed pixels) as a 3-slice series, RLE-compressed: the pixels
    come back as pydicom decodes them, rescaled to HU."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import RLELossless

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = source.pixel_array.astype(np.int32) * int(source.RescaleSlope) + int(source.RescaleIntercept)
    folder = tmp_path / "ct_small"
    folder.mkdir()
    for k in (2, 0, 1):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [_ds(v) for v in (-158.135803, -179.035797, -75.699997 + 5.0 * k)]
        ds.PixelData = (source.pixel_array + k).astype(source.pixel_array.dtype).tobytes()
        ds.compress(RLELossless)
        ds.save_as(folder / f"slice{(k * 7) % 3}.dcm", enforce_file_format=True)
    assert all(pydicom.dcmread(f).file_meta.TransferSyntaxUID == RLELossless for f in folder.iterdir())
    volume = read_volume(folder)
    expected = np.stack([hu.T + k for k in range(3)], axis=-1)
    np.testing.assert_array_equal(volume.array, expected)
    spacing = float(source.PixelSpacing[0])
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([-spacing, -spacing, 5.0]), atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 3], [158.135803, 179.035797, -75.699997], atol=1e-5)
    mask = (volume.array > 1000).astype(np.uint8)  # the scanner's own headers carry into a SEG too
    write_segmentation(series_folder=folder, mask=mask, affine=volume.affine, output=tmp_path / "seg.dcm",
                       checkpoint=Path("best_model.pth"))
    seg, read_back = read_seg(tmp_path / "seg.dcm", folder)
    np.testing.assert_array_equal(read_back, mask)
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_slice", "uneven slice spacing"),
        ("two_series", "holds 2 series"),
        ("mr", "is MR, not CT"),
        ("gantry_tilt", "gantry tilt"),
        ("duplicate", "same position"),
        ("multiframe", "multi-frame"),
        ("empty", "no DICOM files"),
    ],
)
def test_bad_series_are_refused_in_one_line(tmp_path: Path, case: str, expected: str) -> None:
    hu, folder = synthetic_hu(), tmp_path / "s"
    if case == "missing_slice":
        write_ct_series(folder, hu, SYNTH_AFFINE, skip=(4,))
    elif case == "two_series":
        first = write_ct_series(folder, hu, SYNTH_AFFINE)
        second = write_ct_series(folder, hu, SYNTH_AFFINE, seed=1)
    elif case == "mr":
        write_ct_series(folder, hu, SYNTH_AFFINE, modality="MR")
    elif case == "gantry_tilt":
        sheared = SYNTH_AFFINE.copy()
        sheared[:3, 2] += 0.4 * SYNTH_AFFINE[:3, 1]  # each slice shifted along the columns: a tilted gantry
        write_ct_series(folder, hu, sheared)
    elif case == "duplicate":
        uid = write_ct_series(folder, hu, SYNTH_AFFINE)
        write_ct_series(folder, hu[:, :, :1], SYNTH_AFFINE, series_uid=uid, seed=3)
    elif case == "multiframe":
        write_ct_series(folder, hu, SYNTH_AFFINE)
        one = next(folder.iterdir())
        ds = pydicom.dcmread(one)
        ds.NumberOfFrames = 2  # an enhanced (multi-frame) object among the slices
        ds.save_as(one)
    else:
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
    with pytest.raises(UserError) as err:
        read_volume(folder)
    message = str(err.value)
    assert expected in message and "\n" not in message and str(folder) in message
    if case == "two_series":
        assert first in message and second in message


def test_a_single_dicom_file_points_to_its_folder(series) -> None:
    folder, _, _ = series
    with pytest.raises(UserError, match="pass the folder"):
        read_volume(next(folder.iterdir()).with_suffix(".dcm"))


def test_series_uid_picks_one_of_several(tmp_path: Path) -> None:
    hu = synthetic_hu()
    write_ct_series(tmp_path / "s", hu, SYNTH_AFFINE)
    uid = write_ct_series(tmp_path / "s", hu[:, :, ::-1].copy(), SYNTH_AFFINE, seed=2)
    assert scan_series(tmp_path / "s", series_uid=uid).series_uid == uid
    np.testing.assert_array_equal(read_series(tmp_path / "s", series_uid=uid)[0], hu[:, :, ::-1])


def test_a_flat_folder_of_many_series_lists_a_few(tmp_path: Path) -> None:
    for seed in range(7):  # RSNA-style: every slice of every scan in one folder
        write_ct_series(tmp_path / "all", synthetic_hu((8, 8, 4)), SYNTH_AFFINE, seed=seed)
    with pytest.raises(UserError, match=r"holds 7 series .*; \.\.\. and 2 more\); put each series") as err:
        read_volume(tmp_path / "all")
    assert str(err.value).count("(CT 'Head 5mm', 4 files)") == 5


def test_csv_row_may_name_a_series_folder_and_preflight_checks_it(tmp_path: Path) -> None:
    hu = synthetic_hu()
    for name in ("1.2.840.1", "1.2.840.2"):  # UID-like folder names keep their dots
        write_ct_series(tmp_path / "scans" / name, hu, SYNTH_AFFINE, seed=len(name))
    masks = tmp_path / "masks"
    masks.mkdir()
    lesion = np.zeros(hu.shape, dtype=np.uint8)
    lesion[4:7, 4:7, 2:5] = 1
    nib.save(nib.Nifti1Image(lesion, SYNTH_AFFINE), masks / "1.2.840.1.nii.gz")
    (tmp_path / "train.csv").write_text("path,ich,patient_id\nscans/1.2.840.1,1,p1\n")
    (tmp_path / "val.csv").write_text("path,ich,patient_id\nscans/1.2.840.2,0,p2\n")
    train, val = csv_records(tmp_path / "train.csv", tmp_path / "val.csv", masks)
    assert train[0]["case_id"] == "1.2.840.1" and train[0]["label"] == str(masks / "1.2.840.1.nii.gz")
    report = preflight(train, val)
    assert len(report.train) == 1 and len(report.val) == 1
    sample = LoadCased()(train[0])
    np.testing.assert_array_equal(sample["label"][0].numpy(), lesion)
    np.testing.assert_array_equal(sample["image"][0].numpy(), hu)
    shutil.rmtree(tmp_path / "scans" / "1.2.840.2")
    write_ct_series(tmp_path / "scans" / "1.2.840.2", hu, SYNTH_AFFINE, skip=(3,))  # now a slice is missing
    with pytest.raises(UserError, match=r"1\.2\.840\.2.*uneven slice spacing"):
        preflight(train, val)


# --- prediction and DICOM SEG --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A samft checkpoint of a randomly initialised tiny model, with the composed config a run would store."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model.visual_tokens={TINY['visual_tokens']}"])
    config = OmegaConf.to_container(cfg, resolve=False)
    config["data"].update(DATA)
    torch.manual_seed(0)
    model = build_model_from_config(config["model"], with_checkpoint=False)  # the model the config describes
    path = tmp_path_factory.mktemp("run") / "best_model.pth"
    save_checkpoint({"format": FORMAT, "model": model.state_dict(), "config": config}, path)
    return path


def read_seg(path: Path, series: Path) -> tuple[object, np.ndarray]:
    """The SEG read back by highdicom, and its segment 1 as an X x Y x Z mask on the series' slice order."""
    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in scan_series(series).datasets]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    return seg, frames[..., 0].transpose(2, 1, 0)


def assert_seg_on_series(seg, series: Path) -> None:
    """Each frame references one source slice and lies where that slice lies, with its orientation and pixels."""
    sources = {str(ds.SOPInstanceUID): ds for ds in scan_series(series).datasets}
    first = next(iter(sources.values()))
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(sources)
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               first.ImageOrientationPatient, atol=1e-6)
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, first.PixelSpacing, atol=1e-6)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   sources[uid].ImagePositionPatient, atol=1e-3)


def test_seg_holds_the_mask_references_the_series_and_codes_the_bleed(series, tmp_path: Path) -> None:
    folder, hu, _ = series
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[3:9, 4:8, 2:5] = 1  # slices 0, 1, 5, 6, 7 stay empty
    write_segmentation(series_folder=folder, mask=mask, affine=scan_series(folder).affine,
                       output=tmp_path / "out" / "seg.dcm", checkpoint=Path("runs/a/best_model.pth"))
    seg, read_back = read_seg(tmp_path / "out" / "seg.dcm", folder)
    np.testing.assert_array_equal(read_back, mask)
    assert_seg_on_series(seg, folder)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    shutil.copy(tmp_path / "out" / "seg.dcm", folder / "seg.dcm")  # a SEG saved beside its slices is no slice
    np.testing.assert_array_equal(read_volume(folder).array, hu)
    description = seg.get_segment_description(1)
    assert description.segmented_property_type.value == "1386000"  # SNOMED CT: intracranial hemorrhage
    assert description.segmented_property_type.scheme_designator == "SCT"
    assert description.segmented_property_category.value == "49755003"  # morphologically abnormal structure
    algorithm = description.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("samft", samft.__version__)
    assert "best_model.pth" in algorithm.AlgorithmParameters


def test_fractional_seg_holds_probabilities(series, tmp_path: Path) -> None:
    folder, hu, _ = series
    probabilities = np.random.default_rng(0).random(hu.shape).astype(np.float32)
    write_segmentation(series_folder=folder, mask=probabilities, affine=scan_series(folder).affine,
                       output=tmp_path / "prob.dcm", checkpoint=Path("best_model.pth"), fractional=True)
    seg, read_back = read_seg(tmp_path / "prob.dcm", folder)
    assert seg.SegmentationType == "FRACTIONAL"
    np.testing.assert_allclose(read_back, probabilities, atol=0.5 / 255 + 1e-6)


def test_seg_refuses_a_mask_off_the_series_grid(series, tmp_path: Path) -> None:
    folder, hu, affine = series
    with pytest.raises(UserError, match="not on the series' grid"):
        write_segmentation(series_folder=folder, mask=np.zeros(hu.shape, np.uint8), affine=affine * 1.01,
                           output=tmp_path / "seg.dcm", checkpoint=Path("best_model.pth"))


def _predict_cfg(ckpt: Path, source: Path, output: Path, **extra) -> object:
    return OmegaConf.create({"ckpt": str(ckpt), "input": str(source), "output": str(output), "points": None,
                             "probabilities": False, "threshold": 0.5, "overlap": 0.25, "sw_batch_size": 1,
                             "device": "cpu", "output_format": "nifti", **extra})


def test_a_folder_of_series_folders_is_a_batch_named_by_their_paths(tmp_path: Path) -> None:
    batch, hu = tmp_path / "batch", synthetic_hu()
    for patient in ("p1", "p2"):
        write_ct_series(batch / patient / "study" / "CT 5mm", hu, SYNTH_AFFINE)  # same series name twice
    nib.save(nib.Nifti1Image(hu, SYNTH_AFFINE), batch / "extra.nii.gz")
    jobs = plan_jobs(source=batch, output=tmp_path / "out", points_file=None, probabilities=True,
                     output_format="nifti")
    assert [j.image for j in jobs] == [batch / "extra.nii.gz", batch / "p1/study/CT 5mm", batch / "p2/study/CT 5mm"]
    assert [j.mask_out.name for j in jobs] == ["extra_mask.nii.gz", "p1_study_CT 5mm_mask.nii.gz",
                                               "p2_study_CT 5mm_mask.nii.gz"]
    one = plan_jobs(source=batch / "p1/study/CT 5mm", output=tmp_path / "one.dcm", points_file=None,
                    probabilities=True, output_format="dicom_seg")
    assert [(j.image, j.mask_out.name, j.prob_out.name) for j in one] == [
        (batch / "p1/study/CT 5mm", "one.dcm", "one_prob.dcm")]
    with pytest.raises(UserError, match="names a nifti file, but output_format=dicom_seg"):
        plan_jobs(source=batch / "p1/study/CT 5mm", output=tmp_path / "seg.nii.gz", points_file=None,
                  probabilities=False, output_format="dicom_seg")
    with pytest.raises(UserError, match=r"extra\.nii\.gz is not a series folder"):
        plan_jobs(source=batch, output=tmp_path / "out", points_file=None, probabilities=False,
                  output_format="dicom_seg")


def test_predict_writes_nifti_and_seg_on_the_series_grid(series, tmp_path: Path, tiny_checkpoint: Path) -> None:
    folder, hu, affine = series
    assert run_predictions(_predict_cfg(tiny_checkpoint, folder, tmp_path / "nifti", probabilities=True)) == []
    probabilities = nib.load(tmp_path / "nifti" / "series_prob.nii.gz")
    mask = nib.load(tmp_path / "nifti" / "series_mask.nii.gz")
    assert mask.shape == hu.shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-3)
    threshold = float(np.median(probabilities.get_fdata()))  # an untrained model: cut where half the voxels lie
    expected = (probabilities.get_fdata() > threshold).astype(np.uint8)
    assert 0 < expected.sum() < expected.size
    cfg = _predict_cfg(tiny_checkpoint, folder, tmp_path / "seg", output_format="dicom_seg", threshold=threshold)
    assert run_predictions(cfg) == []
    seg, read_back = read_seg(tmp_path / "seg" / "series_seg.dcm", folder)
    np.testing.assert_array_equal(read_back, expected)
    assert_seg_on_series(seg, folder)


def test_dicom_seg_output_needs_series_inputs(tmp_path: Path, tiny_checkpoint: Path) -> None:
    nib.save(nib.Nifti1Image(synthetic_hu(), SYNTH_AFFINE), tmp_path / "scan.nii.gz")
    cfg = _predict_cfg(tiny_checkpoint, tmp_path / "scan.nii.gz", tmp_path / "out", output_format="dicom_seg")
    with pytest.raises(UserError, match="output_format=dicom_seg needs DICOM series inputs") as err:
        run_predictions(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="output_format is 'dicom'"):
        run_predictions(_predict_cfg(tiny_checkpoint, tmp_path / "scan.nii.gz", tmp_path / "o", output_format="dicom"))


@pytest.mark.slow
def test_predict_cli_batch_of_series_reports_a_bad_series_in_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    batch = tmp_path / "batch"
    write_ct_series(batch / "good", synthetic_hu(), SYNTH_AFFINE)
    write_ct_series(batch / "mr_head", synthetic_hu(), SYNTH_AFFINE, modality="MR")
    proc = subprocess.run(
        [sys.executable, "-m", "samft.predict", f"ckpt={tiny_checkpoint}", f"input={batch}",
         f"output={tmp_path / 'out'}", "output_format=dicom_seg", "device=cpu"],
        capture_output=True, text=True, timeout=patience(300),
        env={**os.environ, "SAMFT_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "mr_head" in last and "is MR, not CT" in last
    assert "nvImageCodec" not in proc.stderr
    assert (tmp_path / "out" / "good_seg.dcm").exists() and not (tmp_path / "out" / "mr_head_seg.dcm").exists()


# --- the real head CT as a scanner would send it -------------------------------------------------------------


@pytest.fixture(scope="module")
def head_ct_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    if not HEAD_CT.exists():
        pytest.skip("../shared/data is absent")
    image = nib.load(HEAD_CT)
    hu = np.asanyarray(image.dataobj)
    folder = tmp_path_factory.mktemp("head_ct") / "1.2.826.0.1.3680043.8.498.77"  # folders named by UID
    write_ct_series(folder, hu, image.affine, seed=16)
    return folder, hu, image.affine


def test_head_ct_series_reads_as_its_nifti(head_ct_series) -> None:
    folder, hu, affine = head_ct_series
    assert sorted(p.name for p in folder.iterdir()) != [p.name for p in scan_series(folder).files]  # shuffled
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_allclose(volume.affine, affine, atol=0.01)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")


@pytest.mark.slow
def test_head_ct_series_predicts_onto_its_own_grid_and_into_a_seg(
    head_ct_series, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    folder, hu, affine = head_ct_series
    cfg = _predict_cfg(tiny_checkpoint, HEAD_CT, tmp_path / "nifti", probabilities=True)
    assert run_predictions(cfg) == []
    probabilities = nib.load(tmp_path / "nifti" / "head_ct_prob.nii.gz").get_fdata()
    threshold = float(np.median(probabilities))
    expected = probabilities > threshold
    cfg = _predict_cfg(tiny_checkpoint, folder, tmp_path / "seg.dcm", output_format="dicom_seg", threshold=threshold)
    assert run_predictions(cfg) == []
    seg, read_back = read_seg(tmp_path / "seg.dcm", folder)
    assert read_back.shape == hu.shape
    assert_seg_on_series(seg, folder)
    # the same voxels on the same physical grid give the same mask (up to rounding right at the threshold)
    assert np.mean(read_back != expected) < 1e-4 and 0 < read_back.sum() < read_back.size
