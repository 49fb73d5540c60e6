"""`samft.predict` as a hostile user meets it: NaN scans, oversized headers, outputs that would overwrite inputs
or each other, malformed CSVs and points, clicks outside the scan, and options outside their schema."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.hardening import run_cli, scan, tool_config, unet_checkpoint, write_nifti

from samft.config import refuse_unknown_overrides
from samft.errors import UserError
from samft.inference import Predictor
from samft.predict import PredictConfig, plan_jobs, run_predictions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unet_checkpoint(tmp_path_factory.mktemp("run"))


def _predict(ckpt: Path, source: Path, output: Path, *extra: str) -> list[str]:
    return run_predictions(tool_config("predict", f"ckpt={ckpt}", f"input={source}", f"output={output}",
                                       "device=cpu", *extra))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# item 2: NaN / Inf voxels

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_scan_with_nonfinite_voxels_fails_alone_and_the_rest_are_predicted(tmp_path: Path, ckpt: Path,
                                                                             bad: float) -> None:
    good = scan()
    poisoned = scan(seed=1)
    poisoned.flat[np.random.default_rng(0).choice(poisoned.size, 300, replace=False)] = bad
    write_nifti(tmp_path / "in" / "a_good.nii.gz", good)
    write_nifti(tmp_path / "in" / "b_poisoned.nii.gz", poisoned)
    failures = _predict(ckpt, tmp_path / "in", tmp_path / "out", "probabilities=true")
    assert len(failures) == 1 and "b_poisoned.nii.gz" in failures[0] and "300 voxel(s) are NaN or Inf" in failures[0]
    assert "nonfinite=zero" in failures[0] and "\n" not in failures[0]
    assert not (tmp_path / "out" / "b_poisoned_mask.nii.gz").exists()
    probabilities = nib.load(tmp_path / "out" / "a_good_prob.nii.gz").get_fdata()
    assert np.isfinite(probabilities).all() and probabilities.shape == good.shape


def test_nonfinite_zero_cleans_the_scan_explicitly(tmp_path: Path, ckpt: Path) -> None:
    poisoned = scan()
    poisoned[0, 0, :] = np.nan
    write_nifti(tmp_path / "p.nii.gz", poisoned)
    assert _predict(ckpt, tmp_path / "p.nii.gz", tmp_path / "out", "probabilities=true", "nonfinite=zero") == []
    probabilities = nib.load(tmp_path / "out" / "p_prob.nii.gz").get_fdata()
    assert np.isfinite(probabilities).all()
    cleaned = poisoned.copy()
    cleaned[0, 0, :] = 0
    write_nifti(tmp_path / "c.nii.gz", cleaned)
    assert _predict(ckpt, tmp_path / "c.nii.gz", tmp_path / "out", "probabilities=true") == []
    np.testing.assert_array_equal(probabilities, nib.load(tmp_path / "out" / "c_prob.nii.gz").get_fdata())


@pytest.mark.slow
def test_the_predict_cli_exits_2_naming_the_nan_scan_after_predicting_the_others(tmp_path: Path, ckpt: Path) -> None:
    poisoned = scan()
    poisoned[5, 5, 5] = np.nan
    write_nifti(tmp_path / "in" / "nan_scan.nii.gz", poisoned)
    write_nifti(tmp_path / "in" / "ok_scan.nii.gz", scan(seed=2))
    proc = run_cli("samft.predict", f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                   "device=cpu", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 scan(s) failed") and "nan_scan.nii.gz" in last and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "ok_scan_mask.nii.gz").exists()


# item 3: declared size, one read

def test_a_header_declaring_too_many_voxels_is_refused_before_its_voxels_are_read(tmp_path: Path, ckpt: Path,
                                                                                  monkeypatch) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((1400, 1400, 1200))
    header.set_data_dtype(np.int16)
    path = tmp_path / "bomb.nii"
    with path.open("wb") as handle:  # the header only: reading the voxels would fail (or take 4.7 GB)
        header.write_to(handle)
    predictor = Predictor(ckpt, device=torch.device("cpu"))
    monkeypatch.setattr("samft.inference.read_volume", lambda p: pytest.fail("voxels read before the size check"))
    with pytest.raises(UserError, match=r"bomb.nii: 1400 x 1400 x 1200 voxels .* exceed max_voxels") as err:
        predictor.predict(path)
    _one_line(err)


def test_max_voxels_counts_the_resampled_grid_too(tmp_path: Path, ckpt: Path) -> None:
    # 40 x 36 x 10 voxels of 50 mm: small on disk, 1000 x 900 x 100 at the model's 2 x 2 x 5 mm
    write_nifti(tmp_path / "coarse.nii.gz", scan(), np.diag([50.0, 50.0, 50.0, 1.0]))
    failures = _predict(ckpt, tmp_path / "coarse.nii.gz", tmp_path / "out", "max_voxels=10000000")
    assert len(failures) == 1 and "exceed max_voxels=10,000,000" in failures[0]
    write_nifti(tmp_path / "fine.nii.gz", scan())
    assert _predict(ckpt, tmp_path / "fine.nii.gz", tmp_path / "out", "max_voxels=10000000") == []
    assert len(_predict(ckpt, tmp_path / "fine.nii.gz", tmp_path / "out", "max_voxels=1000")) == 1


def test_predict_reads_each_scan_once(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    from samft.data import readers

    write_nifti(tmp_path / "s.nii.gz", scan())
    reads: list[str] = []
    original_load = readers.nib.load

    def counting_load(path, *args, **kwargs):
        image = original_load(path, *args, **kwargs)
        real = image.dataobj

        class Spy:
            def __array__(self, *a, **k):
                reads.append(str(path))
                return np.asarray(real, *a, **k)

            def __getattr__(self, name):
                return getattr(real, name)

        image._dataobj = Spy()
        return image

    monkeypatch.setattr("nibabel.load", counting_load)
    monkeypatch.setattr(readers.nib, "load", counting_load)
    Predictor(ckpt, device=torch.device("cpu")).predict(tmp_path / "s.nii.gz")
    assert reads == [str(tmp_path / "s.nii.gz")]


# item 4: outputs that collide or overwrite inputs; atomic writes

def test_two_inputs_with_one_output_name_are_refused_before_inference(tmp_path: Path) -> None:
    write_nifti(tmp_path / "in" / "x.nii.gz", scan())
    write_nifti(tmp_path / "in" / "x.nii", scan())
    with pytest.raises(UserError, match=r"would both be written to .*x_mask\.nii\.gz") as err:
        plan_jobs(source=tmp_path / "in", output=tmp_path / "out", points_file=None, probabilities=False)
    _one_line(err)
    write_nifti(tmp_path / "a" / "y.nii.gz", scan())
    with open(tmp_path / "y.pkl", "wb") as handle:
        import pickle

        pickle.dump(scan(), handle)
    (tmp_path / "list.csv").write_text(f"path\n{tmp_path / 'a' / 'y.nii.gz'}\ny.pkl\n")
    with pytest.raises(UserError, match="would both be written"):
        plan_jobs(source=tmp_path / "list.csv", output=tmp_path / "out", points_file=None, probabilities=True)


def test_an_output_over_or_inside_an_input_is_refused_and_the_input_kept(tmp_path: Path, ckpt: Path) -> None:
    ct = write_nifti(tmp_path / "ct.nii.gz", scan())
    before = ct.read_bytes()
    with pytest.raises(UserError, match="over the input") as err:
        _predict(ckpt, ct, ct)
    _one_line(err)
    assert ct.read_bytes() == before
    with pytest.raises(UserError, match="inside the input"):
        _predict(ckpt, tmp_path, tmp_path)
    with pytest.raises(UserError, match="inside the input"):
        _predict(ckpt, tmp_path, tmp_path / "masks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
    (tmp_path / "list.csv").write_text("path\nct.nii.gz\n")
    with pytest.raises(UserError, match="holds input scans"):  # a batch's masks are not mixed into its scans
        _predict(ckpt, tmp_path / "list.csv", tmp_path)
    (tmp_path / "list.csv").unlink()
    # beside a single input is fine: the scan is not read back from there
    assert _predict(ckpt, ct, tmp_path / "ct_seg.nii.gz") == [] and ct.read_bytes() == before


def test_outputs_are_written_atomically(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    write_nifti(tmp_path / "s.nii.gz", scan())
    out = tmp_path / "out" / "s_mask.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"previous mask")
    real_save = nib.save
    targets: list[str] = []

    def interrupted_save(image, filename):
        targets.append(Path(filename).name)
        real_save(image, filename)
        raise KeyboardInterrupt  # killed right after the bytes hit the disk, before the rename

    monkeypatch.setattr(nib, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _predict(ckpt, tmp_path / "s.nii.gz", tmp_path / "out")
    assert targets and targets[0] != "s_mask.nii.gz" and targets[0].endswith(".nii.gz")
    assert out.read_bytes() == b"previous mask" and [p.name for p in out.parent.iterdir()] == ["s_mask.nii.gz"]


# item 5: one line for input, points and output mistakes

@pytest.mark.parametrize("content, message", [
    (None, "CSV file not found"),
    ("", "the CSV is empty"),
    ("path\n", "header but no rows"),
    ("path,ich\nscan.nii.gz,1\n,0\n", "'path' cell is empty on line(s) 3"),
    ("name\nscan.nii.gz\n", "missing column(s) path"),
])
def test_bad_input_csvs_are_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    csv = tmp_path / "scans.csv"
    if content is not None:
        csv.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        plan_jobs(source=csv, output=tmp_path / "out", points_file=None, probabilities=False)
    _one_line(err)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    ('[[1, 2, 3, 1]]', "holds a list"),
    ('{"s.nii.gz": [1, 2, 3, 1]}', "entry for 's.nii.gz'"),
    ('{"s.nii.gz": [[1, 2, 3]]}', "entry for 's.nii.gz'"),
    ('{"s.nii.gz": [[1, 2, 3, 2]]}', "entry for 's.nii.gz'"),
    ('{"s.nii.gz": [["a", 2, 3, 1]]}', "entry for 's.nii.gz'"),
    ('{"s.nii.gz": [[NaN, 2, 3, 1]]}', "entry for 's.nii.gz'"),
    ('{"s.nii.gz": []}', "entry for 's.nii.gz'"),
])
def test_bad_points_files_are_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    write_nifti(tmp_path / "in" / "s.nii.gz", scan())
    points = tmp_path / "points.json"
    if content is not None:
        points.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        plan_jobs(source=tmp_path / "in", output=tmp_path / "out", points_file=points, probabilities=False)
    _one_line(err)


@pytest.mark.parametrize("click", [[40, 5, 5, 1], [-1, 5, 5, 1], [5, 5, 10, 1], [5, 36.5, 5, 0]])
def test_clicks_outside_the_scan_are_refused(tmp_path: Path, ckpt: Path, click: list[float]) -> None:
    from samft.inference import check_clicks

    write_nifti(tmp_path / "s.nii.gz", scan())  # 40 x 36 x 10
    with pytest.raises(UserError, match="lies outside the scan") as err:
        check_clicks([click], (40, 36, 10), tmp_path / "s.nii.gz")
    _one_line(err)
    check_clicks([[39, 35, 9, 1], [0, 0, 0, 0]], (40, 36, 10), tmp_path / "s.nii.gz")
    (tmp_path / "p.json").write_text(json.dumps({"s.nii.gz": [click]}))
    failures = _predict(ckpt, tmp_path / "s.nii.gz", tmp_path / "out", f"points={tmp_path / 'p.json'}")
    assert len(failures) == 1 and "lies outside the scan" in failures[0]  # a U-Net takes no clicks either


def test_an_output_folder_under_a_file_is_one_line(tmp_path: Path) -> None:
    write_nifti(tmp_path / "in" / "s.nii.gz", scan())
    (tmp_path / "notes.txt").write_text("x")
    for output in (tmp_path / "notes.txt" / "out", tmp_path / "notes.txt", tmp_path / "notes.txt" / "s.nii.gz"):
        with pytest.raises(UserError, match="is a file, not a folder") as err:
            plan_jobs(source=tmp_path / "in", output=output, points_file=None, probabilities=False)
        _one_line(err)


@pytest.mark.parametrize("override, message", [
    ("overlap=1.5", "'overlap' is 1.5"),
    ("overlap=-0.1", "'overlap' is -0.1"),
    ("sw_batch_size=0", "'sw_batch_size' is 0"),
    ("threshold=abc", "'threshold'"),
    ("threshold=nan", "'threshold' is nan"),
    ("threshold=1.5", "'threshold' is 1.5"),
    ("device=tpu", "'device' is 'tpu'"),
    ("nonfinite=ignore", "'nonfinite' is 'ignore'"),
    ("max_voxels=0", "'max_voxels' is 0"),
    ("+foo=1", "unknown config key 'foo'.*max_voxels"),
])
def test_options_outside_the_schema_fail_before_any_work(tmp_path: Path, override: str, message: str,
                                                         monkeypatch) -> None:
    monkeypatch.setattr("samft.predict.plan_jobs", lambda **_: pytest.fail("work began before the check"))
    cfg = tool_config("predict", "ckpt=missing.pth", f"input={tmp_path}", f"output={tmp_path / 'o'}", override)
    with pytest.raises(UserError, match=message) as err:
        run_predictions(cfg)
    _one_line(err)


@pytest.mark.slow
def test_unknown_keys_list_the_tools_own_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown config key 'epochs' for samft.predict; its keys: ckpt") as err:
        refuse_unknown_overrides(["ckpt=a", "epochs=3"], PredictConfig, tool="predict")
    assert "optim" not in str(err.value) and "nonfinite" in str(err.value)
    refuse_unknown_overrides(["ckpt=a", "hydra.run.dir=x", "--cfg", "job", "-m"], PredictConfig, tool="predict")
    proc = run_cli("samft.evaluate", "output=o", "foo=1", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "for samft.evaluate" in proc.stderr and "pred_dir" in proc.stderr and "optim" not in proc.stderr


@pytest.mark.slow
def test_a_predict_cli_option_error_is_one_line_with_exit_2(tmp_path: Path) -> None:
    proc = run_cli("samft.predict", "ckpt=x.pth", f"input={tmp_path}", "output=o", "overlap=1.5", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'overlap' is 1.5" in proc.stderr


@pytest.mark.parametrize("damage", ["weights_of_another_model", "no_weights", "no_intensity"])
def test_a_checkpoint_whose_config_and_weights_disagree_is_one_line(tmp_path: Path, ckpt: Path, damage: str) -> None:
    from samft.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(ckpt)
    if damage == "weights_of_another_model":
        state["model"] = {"decoder.weight": torch.zeros(3)}
    elif damage == "no_weights":
        del state["model"]
    else:
        del state["config"]["data"]["intensity"]
    save_checkpoint(state, tmp_path / "best_model.pth")
    with pytest.raises(UserError, match="do not rebuild a model") as err:
        Predictor(tmp_path / "best_model.pth", device=torch.device("cpu"))
    _one_line(err)
