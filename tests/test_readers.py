"""Safe readers: accepted .pkl forms, refused pickles (payload never runs), NIfTI geometry, MONAI reader."""

from __future__ import annotations

import gzip
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import NibabelReader
from monai.transforms import LoadImaged

from samft.data.readers import (
    IMAGE_KEYS,
    PickleVolumeReader,
    image_reader_for,
    load_nifti,
    read_volume,
    volume_stem,
)
from samft.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OBLIQUE = np.array(
    [[-0.5, 0.0, 0.0, 10.0], [0.0, -0.47, -1.6, 20.0], [0.0, -0.16, 4.7, -5.0], [0.0, 0.0, 0.0, 1.0]]
)


def volume(shape: tuple[int, ...] = (16, 16, 8)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 1000


def write_pickle(path: Path, obj: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


class SystemCall:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_bare_array_reads_with_identity_affine(tmp_path: Path, protocol: int) -> None:
    array = volume()
    loaded, affine = read_volume(write_pickle(tmp_path / "a.pkl", array, protocol))[:2]
    np.testing.assert_array_equal(loaded, array)
    assert loaded.dtype == np.int16
    np.testing.assert_array_equal(affine, np.eye(4))
    assert read_volume(tmp_path / "a.pkl").has_geometry is False


@pytest.mark.parametrize("key", IMAGE_KEYS)
def test_dict_with_spacing_under_every_image_key(tmp_path: Path, key: str) -> None:
    array = volume()
    path = write_pickle(tmp_path / "a.pkl", {key: array, "spacing": (0.5, np.float64(0.5), 5.0), "id": "x"}, 2)
    loaded, affine = read_volume(path)[:2]
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_allclose(affine, np.diag([0.5, 0.5, 5.0, 1.0]))


def test_ordered_dict_with_oblique_affine(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "a.pkl", OrderedDict(volume=volume().astype(np.float32), affine=OBLIQUE.tolist()))
    loaded, affine = read_volume(path)[:2]
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(affine, OBLIQUE)
    assert read_volume(path).has_geometry


def test_singleton_fourth_axis_is_dropped(tmp_path: Path) -> None:
    loaded = read_volume(write_pickle(tmp_path / "a.pkl", volume((1, 16, 16, 8)))).array
    assert loaded.shape == (16, 16, 8)


def test_os_system_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "evil.pkl", {"image": volume(), "spacing": SystemCall(marker)})
    with pytest.raises(UserError, match=r"evil\.pkl: refused to unpickle the global '(posix|nt|os)\.system'"):
        read_volume(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_eval_payload_is_refused_and_never_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "evil.pkl", EvalCall(marker), protocol)
    with pytest.raises(UserError, match=r"evil\.pkl: .*'(__builtin__|builtins)\.eval'"):
        read_volume(path)
    assert not marker.exists()


def test_arbitrary_class_is_refused(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "obj.pkl", {"image": volume(), "meta": Path("x")})
    with pytest.raises(UserError, match=r"obj\.pkl: refused to unpickle the global 'pathlib\."):
        read_volume(path)


def test_malicious_pickle_through_monai_surfaces_the_refusal(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "evil.pkl", SystemCall(marker))
    loader = LoadImaged(keys=["image"], image_only=True)
    loader.register(PickleVolumeReader())
    with pytest.raises(UserError, match="evil.pkl: refused"):
        loader({"image": str(path)})
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x04 this is not a pickle", "cannot read it as a pickle"),
        (pickle.dumps(volume())[:100], "cannot read it as a pickle"),
        (b"", "cannot read it as a pickle"),
    ],
)
def test_corrupt_pickle(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.pkl").write_bytes(content)
    with pytest.raises(UserError, match=rf"bad\.pkl: {message}"):
        read_volume(tmp_path / "bad.pkl")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (volume((16, 16)), r"shape \(16, 16\); expected a 3-D volume"),
        (volume((2, 16, 16, 8)), r"shape \(2, 16, 16, 8\); expected a 3-D volume"),
        ({"pixels": volume()}, r"keys \['pixels'\], none of image, img"),
        ([volume()], "holds a list; expected a numpy array"),
        ({"image": np.array(["a", "b"])}, "expected a numeric numpy array"),
        ({"image": volume(), "spacing": (1.0, 0.0, 1.0)}, "'spacing' is .*three positive mm values"),
        ({"image": volume(), "affine": np.eye(3)}, "'affine' is not an invertible 4 x 4"),
    ],
)
def test_unusable_content(tmp_path: Path, obj: object, message: str) -> None:
    path = write_pickle(tmp_path / "odd.pkl", obj)
    with pytest.raises(UserError, match=rf"odd\.pkl: .*{message}"):
        read_volume(path)


def test_missing_files(tmp_path: Path) -> None:
    for name in ("gone.pkl", "gone.nii.gz"):
        with pytest.raises(UserError, match=rf"{name}: file not found"):
            read_volume(tmp_path / name)
    with pytest.raises(UserError, match=r"scan\.npy: unsupported volume format"):
        read_volume(tmp_path / "scan.npy")


@pytest.mark.parametrize(
    ("name", "stem"),
    [("CT_001.nii.gz", "CT_001"), ("ct_001.NII", "ct_001"), ("ct_001.Nii.Gz", "ct_001"), ("scan.v2.nii.gz", "scan.v2"),
     ("a.PKL", "a"), ("a.pickle", "a"), ("notes.txt", "notes")],
)
def test_volume_stem_drops_the_suffix_in_any_case_and_keeps_the_name_as_written(name: str, stem: str) -> None:
    assert volume_stem(Path("/data") / name) == stem


def test_volume_stem_keeps_a_series_folder_whole(tmp_path: Path) -> None:
    (tmp_path / "1.2.840.113619.2").mkdir()
    assert volume_stem(tmp_path / "1.2.840.113619.2") == "1.2.840.113619.2"


def test_sources_and_predict_name_scans_by_the_same_stem(tmp_path: Path) -> None:
    """Upper-case suffixes: the folder source finds the scans and their masks, predict lists the same scans,
    and both name them by ``volume_stem``."""
    from samft.data.sources import nifti_folder_records
    from samft.predict import list_inputs, output_stem

    images, labels = tmp_path / "images", tmp_path / "labels"
    for folder in (images, labels):
        folder.mkdir()
        for name, value in (("CT_001.nii.gz", 1), ("ct_002.NII", 0)):
            nib.save(nib.Nifti1Image(np.full((4, 4, 2), value, dtype=np.uint8), np.eye(4)), folder / name)
    train, val = nifti_folder_records(images, labels, val_fraction=0.5, seed=0)
    records = {r["case_id"]: r for r in train + val}
    assert set(records) == {"CT_001", "ct_002"}
    assert {r["patient_id"] for r in records.values()} == {"CT_001", "ct_002"}
    assert Path(records["ct_002"]["label"]).name == "ct_002.NII" and records["ct_002"]["ich"] == 0
    assert Path(records["CT_001"]["label"]).name == "CT_001.nii.gz" and records["CT_001"]["ich"] == 1
    scans = list_inputs(images)
    assert sorted(output_stem(scan, images) for scan in scans) == sorted(records)


def test_nifti_keeps_oblique_affine_dtype_and_drops_singleton_axis(tmp_path: Path) -> None:
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(volume()[..., None], OBLIQUE), path)
    array, affine = load_nifti(path)
    np.testing.assert_array_equal(array, volume())
    assert array.dtype == np.int16
    np.testing.assert_allclose(affine, OBLIQUE, atol=1e-5)


def test_corrupt_nifti(tmp_path: Path) -> None:
    good = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(volume(), OBLIQUE), good)
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.nii").write_text("not an image")
    for name in ("cut.nii.gz", "text.nii"):
        with pytest.raises(UserError, match=rf"{name}: cannot read it as NIfTI"):
            load_nifti(tmp_path / name)


def test_load_imaged_reads_pickle_and_nifti_with_their_affines(tmp_path: Path) -> None:
    image = write_pickle(tmp_path / "a.pkl", {"image": volume(), "affine": OBLIQUE})
    label = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.uint8), OBLIQUE), label)
    registered = LoadImaged(keys=["image", "label"], image_only=True)
    registered.register(PickleVolumeReader())
    for loader in (LoadImaged(keys=["image", "label"], reader=PickleVolumeReader(), image_only=True), registered):
        data = loader({"image": str(image), "label": str(label)})
        np.testing.assert_array_equal(data["image"].numpy(), volume())
        np.testing.assert_allclose(data["image"].affine.numpy(), OBLIQUE)
        np.testing.assert_allclose(data["label"].affine.numpy(), OBLIQUE, atol=1e-5)
        assert data["image"].meta["has_geometry"] is True


def test_image_reader_for() -> None:
    assert isinstance(image_reader_for("x/scan.PKL"), PickleVolumeReader)
    assert isinstance(image_reader_for("x/scan.nii.gz"), NibabelReader)
    assert PickleVolumeReader().verify_suffix(["a.pkl", "b.pickle"])
    assert not PickleVolumeReader().verify_suffix(["a.pkl", "b.nii"])


def test_pickle_reader_stacks_channels(tmp_path: Path) -> None:
    paths = [write_pickle(tmp_path / f"{i}.pkl", volume() + i) for i in range(2)]
    reader = PickleVolumeReader()
    array, meta = reader.get_data(reader.read(paths))
    assert array.shape == (2, 16, 16, 8)
    assert meta["original_channel_dim"] == 0
    np.testing.assert_array_equal(array[1], volume() + 1)


def test_gzip_of_a_pickle_is_not_unpickled(tmp_path: Path) -> None:
    (tmp_path / "z.pkl").write_bytes(gzip.compress(pickle.dumps(volume())))
    with pytest.raises(UserError, match="cannot read it as a pickle"):
        read_volume(tmp_path / "z.pkl")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "head_ct.nii.gz").is_file():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def test_real_head_ct_keeps_oblique_affine_and_anisotropic_spacing(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "head_ct.nii.gz"
    array, affine = load_nifti(path)
    assert array.shape == (512, 512, 29)
    assert array.dtype == np.int16
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.488, 0.488, 5.0], atol=1e-3)
    tilt = np.degrees(np.arccos(abs(affine[2, 2]) / np.linalg.norm(affine[:3, 2])))
    assert tilt == pytest.approx(18.5, abs=0.5)  # the gantry tilt lives in the affine
    assert "".join(nib.aff2axcodes(affine)) == "LPS"
    np.testing.assert_array_equal(affine, nib.load(path).affine)

    data = LoadImaged(keys=["image"], image_only=True)({"image": str(path)})
    np.testing.assert_allclose(data["image"].affine.numpy(), affine)

    repickled = write_pickle(tmp_path / "head.pkl", {"image": array, "affine": affine})
    again, again_affine = read_volume(repickled)[:2]
    np.testing.assert_array_equal(again, array)
    np.testing.assert_array_equal(again_affine, affine)


def test_real_hemorrhage_masks_keep_geometry(shared_data: Path) -> None:
    masks = sorted((shared_data / "hemorrhage_masks" / "train").glob("*.nii.gz"))[:3]
    assert masks
    for path in masks:
        array, affine = load_nifti(path)
        header = nib.load(path)
        assert array.shape == header.shape[:3]
        assert set(np.unique(array).tolist()) <= {0, 1}
        np.testing.assert_allclose(affine, header.affine)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        assert spacing[2] > 2 * spacing[0]  # thick slices survive reading
