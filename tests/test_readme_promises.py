"""README promises checked through the real entry points on tiny configs: pruning of a real trial in an Optuna
sweep, a sweep resumed after a crash left a RUNNING trial, `logger=wandb` from the command line, the encoder
export against best_model.pth, predict with `points=` on a CSV batch, and per-rank sharding in a whole DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from helpers.patience import patience
from helpers.wandb_records import history_rows, read_records, run_files
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.trial import TrialState

from samft import distributed
from samft.config import validate
from samft.data.demo import ensure_demo_dataset
from samft.engine.checkpoint import FORMAT, save_checkpoint
from samft.model import build_model
from samft.runner import _train_spawned
from samft.segmentation import OUTSIDE_LOGIT
from samft.sweep.liveness import REASON_ATTR

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[1] / "conf"
STUDY = "ich_optuna"
# the smoke experiment cut to one optimiser step per epoch and one validation scan (tiny SAM-Med3D, demo data)
SMOKE = ("experiment=smoke", "max_steps_per_epoch=1", "val_scans=1", "hardware.num_workers=0",
         "hardware.cpu_threads=1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke experiment's demo data (4 patients, seed 0), generated once for the module."""
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_dataset(root=root, n_patients=4, seed=0)
    return root


def env_for(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(root / "cache"), **extra}


def run_module(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=patience(600), cwd=cwd,
                          env=env or env_for(cwd))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def sweep_args(root: Path, demo: Path, *extra: str) -> list[str]:
    return ["samft.train", "-m", "hparams_search=ich_optuna", *SMOKE, f"output_dir={root}", f"data.demo_dir={demo}",
            "hparams_search.n_trials=1", *extra]


def storage_url(root: Path) -> str:
    """The study the sweep keeps by default: sqlite in its sweep folder."""
    return f"sqlite:///{root / 'sweeps' / STUDY / 'optuna.db'}"


# ---------------------------------------------------------------- Optuna sweeps through samft.train


def test_a_real_trial_reporting_below_the_median_is_pruned_after_its_first_epoch(tmp_path: Path, demo: Path) -> None:
    """Two earlier trials scored a perfect Dice after every epoch; the real one reports its epoch-1 Dice through
    the Trainer's epoch callback, the median pruner stops it, and the sweep records it PRUNED."""
    (tmp_path / "sweeps" / STUDY).mkdir(parents=True)
    study = optuna.create_study(study_name=STUDY, storage=storage_url(tmp_path), direction="maximize")
    for _ in range(2):
        trial = study.ask()
        for epoch in (1, 2, 3):
            trial.report(1.0, step=epoch)
        study.tell(trial, 1.0)

    run_module(*sweep_args(tmp_path, demo, "epochs=3", "hparams_search.pruner=median"), cwd=tmp_path)

    trial = optuna.load_study(study_name=STUDY, storage=storage_url(tmp_path)).trials[2]
    summary = json.loads((tmp_path / "sweeps" / STUDY / "trial_2" / "summary.json").read_text())
    assert trial.state == TrialState.PRUNED
    assert summary["stop_reason"] == "pruned" and summary["epochs_run"] == 1  # of epochs=3
    # what the trial reported is the run's own validation Dice after epoch 1
    assert trial.intermediate_values == {1: summary["history"][0]["val/dice"]}
    table = pd.read_csv(tmp_path / "sweeps" / STUDY / "trials.csv")
    assert table.loc[2, "state"] == "PRUNED" and table.loc[2, "epochs_run"] == 1


def test_a_sweep_killed_with_a_running_trial_resumes_and_fails_that_trial(tmp_path: Path, demo: Path) -> None:
    """SIGKILL in the middle of trial 0 leaves it RUNNING in the sqlite study; the same command again marks it
    FAIL (its worker is gone), continues the study in the same sweep folder and completes a new trial."""
    args = sweep_args(tmp_path, demo, "epochs=1", "hparams_search.pruner=none")
    worker = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=tmp_path, env=env_for(tmp_path))
    trial_log = tmp_path / "sweeps" / STUDY / "trial_0" / "train.log"
    deadline = time.monotonic() + patience(300)
    # killed once the trial trains: it is RUNNING in the study and its run folder has a log
    while not (trial_log.is_file() and "samples" in trial_log.read_text()):
        assert worker.poll() is None and time.monotonic() < deadline, "the first sweep ended before its kill"
        time.sleep(0.2)
    worker.kill()
    worker.wait(timeout=patience(60))
    trials = optuna.load_study(study_name=STUDY, storage=storage_url(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.RUNNING]

    run_module(*args, cwd=tmp_path)

    trials = optuna.load_study(study_name=STUDY, storage=storage_url(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "is gone" in trials[0].user_attrs[REASON_ATTR]
    summary = json.loads((tmp_path / "sweeps" / STUDY / "trial_1" / "summary.json").read_text())
    assert trials[1].value == summary["best_metric"] and summary["stop_reason"] == "completed"
    table = pd.read_csv(tmp_path / "sweeps" / STUDY / "trials.csv")
    assert list(table["state"]) == ["FAIL", "COMPLETE"]


# ---------------------------------------------------------------- logger=wandb and the export, one run


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> Path:
    """`python -m samft.train experiment=smoke logger=wandb logger.mode=offline` with WANDB_MODE=offline."""
    root = tmp_path_factory.mktemp("wandb")
    home = str(root / "wandb-home")
    env = env_for(root, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=home, WANDB_CONFIG_DIR=home,
                  WANDB_CACHE_DIR=home, WANDB_DATA_DIR=home)
    run_dir = root / "run"
    run_module("samft.train", *SMOKE, "epochs=2", "logger=wandb", "logger.mode=offline", "logger.project=samft-ci",
               f"hydra.run.dir={run_dir}", f"data.demo_dir={demo}", cwd=root, env=env)
    return run_dir


def test_logger_wandb_from_the_command_line_records_the_run_offline(wandb_run: Path) -> None:
    run_id = torch.load(wandb_run / "latest_model.pth", weights_only=True)["logger_run_id"]
    (run_file,) = run_files(wandb_run, run_id)
    records = read_records(run_file)  # wandb's own record format (protobuf), as `wandb sync` reads it
    (run,) = [r.run for kind, r in records if kind == "run"]
    assert run.run_id == run_id and run.project == "samft-ci"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["name"] == "sam_med3d_tiny" and config["epochs"] == 2
    summary = json.loads((wandb_run / "summary.json").read_text())
    logged = {row["epoch"]: row for row in history_rows(records) if "epoch" in row}
    assert sorted(logged) == [1, 2]
    for epoch in summary["history"]:
        assert logged[epoch["epoch"]]["val/dice"] == pytest.approx(epoch["val/dice"], rel=1e-12)
        assert logged[epoch["epoch"]]["train/loss"] == pytest.approx(epoch["train/loss"], rel=1e-12)
    finals = {}
    for kind, record in records:
        if kind == "summary":
            finals.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    assert finals["stop_reason"] == "completed" and finals["best_metric"] == pytest.approx(summary["best_metric"])


def test_the_encoder_export_holds_the_heads_and_encoder_of_best_model(wandb_run: Path) -> None:
    export = torch.load(wandb_run / "sam_encoder.pth", weights_only=True)
    best = torch.load(wandb_run / "best_model.pth", weights_only=True)["model"]
    for prefix, key in (("representation_head.", "representation_head_state_dict"),
                        ("image_encoder.", "image_encoder_state_dict")):
        expected = {k[len(prefix):]: v for k, v in best.items() if k.startswith(prefix)}
        assert expected and export[key].keys() == expected.keys(), key
        for name, tensor in expected.items():
            assert torch.equal(export[key][name], tensor), f"{key}.{name}"


# ---------------------------------------------------------------- predict: points= on a CSV batch


def test_predict_decodes_the_clicked_scan_of_a_csv_batch_with_its_points(tmp_path: Path) -> None:
    """A CSV lists two scans, `points=` clicks one of them: that one is decoded in one 128^3 window around the
    click (everything beyond it gets OUTSIDE_LOGIT), the other prompt-free over the whole scan."""
    torch.manual_seed(0)
    (tmp_path / "run").mkdir()
    tiny = {"name": "sam_med3d_tiny", "visual_tokens": 32}
    data = {"spacing": [1.5, 1.5, 1.5], "roi_size": 128, "intensity": "window", "window_center": 40.0,
            "window_width": 80.0}
    save_checkpoint({"format": FORMAT, "model": build_model(**tiny).state_dict(), "config": {"model": tiny,
                     "data": data}}, tmp_path / "run" / "best_model.pth")
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    rng = np.random.default_rng(0)
    scans = {}
    for name in ("clicked", "free"):
        scans[name] = rng.normal(35, 10, size=(176, 40, 24)).astype(np.int16)  # 264 mm: two windows along x
        (tmp_path / "scans").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(scans[name], affine), tmp_path / "scans" / f"{name}.nii.gz")
    pd.DataFrame({"path": [str(tmp_path / "scans" / f"{n}.nii.gz") for n in scans]}).to_csv(tmp_path / "batch.csv",
                                                                                              index=False)
    (tmp_path / "clicks.json").write_text(json.dumps({"clicked.nii.gz": [[20, 20, 12, 1]]}))

    run_module("samft.predict", f"ckpt={tmp_path / 'run' / 'best_model.pth'}", f"input={tmp_path / 'batch.csv'}",
               f"output={tmp_path / 'out'}", f"points={tmp_path / 'clicks.json'}", "probabilities=true",
               f"hydra.run.dir={tmp_path / 'logs'}", cwd=tmp_path)

    outside = 1.0 / (1.0 + np.exp(-OUTSIDE_LOGIT))
    for name, scan in scans.items():
        mask, prob = (nib.load(tmp_path / "out" / f"{name}_{kind}.nii.gz") for kind in ("mask", "prob"))
        assert mask.shape == prob.shape == scan.shape and np.allclose(prob.affine, affine)
        far = prob.get_fdata()[140:]  # more than a window's width from the click
        near = prob.get_fdata()[:100]
        if name == "clicked":
            assert np.allclose(far, outside, rtol=1e-3) and near.max() > 100 * outside
        else:
            assert far.min() > 100 * outside  # prompt-free windows cover the whole scan


# ---------------------------------------------------------------- per-rank sharding in a whole DDP run


def record_training_reads(resolved: dict[str, Any], run_dir: str, out: str) -> float:
    """One spawned rank of a whole run (`samft.runner`'s own worker), recording every training sample it reads."""
    from samft.data import datamodule

    reads: list[list[int]] = []
    read = datamodule.SeededSamples.__getitem__

    def recorded(self, key):
        if isinstance(key, tuple):  # (index, epoch): the train loader's keys
            reads.append(list(key))
        return read(self, key)

    datamodule.SeededSamples.__getitem__ = recorded
    try:
        return _train_spawned(resolved, run_dir)
    finally:
        Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps(reads))


def test_a_whole_ddp_run_trains_each_rank_on_its_own_shard_and_together_on_the_whole_train_set(
    tmp_path: Path, demo: Path
) -> None:
    overrides = ["experiment=smoke", "model=unet", "data.roi_size=32", "epochs=1", "val_scans=2", "hardware=ddp",
                 "hardware.precision=fp32", "hardware.nproc_per_node=2", "hardware.num_workers=0",
                 "hardware.cpu_threads=1", "hardware.pin_memory=false", f"data.demo_dir={demo}",
                 "data.batch_size=1", "max_steps_per_epoch=null"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    resolved = OmegaConf.to_container(validate(cfg), resolve=True)
    run_dir = tmp_path / "run"
    objective = distributed.spawn(record_training_reads, args=(resolved, str(run_dir), str(tmp_path)), nprocs=2,
                                  backend="gloo", timeout_min=2)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and objective == summary["best_metric"]
    n_train = json.loads((run_dir / "stats.json").read_text())["train"]["n_samples"]
    reads = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    epochs = sorted({e for rank_reads in reads for _, e in rank_reads})
    assert len(epochs) == 1 and n_train % 2 == 0  # (an odd set would repeat one sample to even the shards)
    for epoch in epochs:
        shards = [sorted(index for index, e in rank_reads if e == epoch) for rank_reads in reads]
        assert len(shards[0]) == len(shards[1]) == n_train // 2, shards
        assert not set(shards[0]) & set(shards[1])  # disjoint
        assert sorted(shards[0] + shards[1]) == list(range(n_train))  # together: the whole train set
