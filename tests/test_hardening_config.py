"""NaN and Inf in any float key, and out-of-range seeds, are one line before any data is read; the tools'
schemas; stale checkpoint temporaries; damaged encoder exports; lesion insertion's --out under a file."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hardening import run_cli
from helpers.patience import patience
from omegaconf import OmegaConf

from samft.config import TrainConfig, validate
from samft.engine.checkpoint import FORMAT, load_checkpoint, remove_stale_temporaries, save_checkpoint
from samft.errors import UserError


def _float_keys(schema: Any = TrainConfig, prefix: str = "") -> list[str]:
    """Every float (or optional float) key of the training schema, at any depth."""
    keys = []
    for field in dataclasses.fields(schema):
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field.default_factory if field.default_factory is not dataclasses.MISSING
                                    else None):
            keys += _float_keys(field.default_factory, f"{name}.")
        elif str(field.type).replace(" ", "") in ("float", "float|None"):
            keys.append(name)
    return keys


def _validate(**overrides: Any) -> None:
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    validate(cfg)


def test_the_schema_has_the_float_keys_the_issue_names() -> None:
    keys = _float_keys()
    assert {"optim.lr", "min_delta", "model.lesion_pos_weight", "data.window_center"} <= set(keys)
    assert len(keys) >= 15


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_key_refuses_nan_and_inf(key: str, value: float) -> None:
    with pytest.raises(UserError, match=rf"config key '{key}' is -?(nan|inf); give a finite number") as err:
        _validate(**{key: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value", [("data.spacing", [1.5, float("nan"), 1.5]),
                                        ("optim.betas", [0.9, float("inf")])])
def test_nan_inside_float_lists_is_refused(key: str, value: list[float]) -> None:
    with pytest.raises(UserError, match=rf"config key '{key}\[1\]' is (nan|inf)"):
        _validate(**{key: value})


@pytest.mark.parametrize("seed, ok", [(-1, False), (2**32, False), (0, True), (2**32 - 1, True)])
def test_seed_has_a_range(seed: int, ok: bool) -> None:
    if ok:
        _validate(seed=seed)
    else:
        with pytest.raises(UserError, match=rf"config key 'seed' is {seed}; it must be >= 0 and <= 4294967295"):
            _validate(seed=seed)


def test_train_cli_nan_is_one_line_before_data_is_read(tmp_path: Path) -> None:
    proc = run_cli("samft.train", "optim.lr=nan", f"data.demo_dir={tmp_path / 'never'}", f"output_dir={tmp_path}",
                   tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: config key 'optim.lr' is nan; give a finite number"
    assert not (tmp_path / "never").exists()


# item 7: temporaries a SIGKILL left behind

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_resume_removes_stale_checkpoint_temporaries_only(tmp_path: Path) -> None:
    save_checkpoint({"format": FORMAT, "epoch": 1}, tmp_path / "latest_model.pth")
    # a real SIGKILL between the write of the temporary and its rename
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "import samft.engine.checkpoint as c\n"
        "c.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.save_checkpoint({'format': c.FORMAT, 'epoch': 2}, c.Path(sys.argv[1]))\n"),
        str(tmp_path / "latest_model.pth")], timeout=patience(120))
    assert killed.returncode == -9
    stale = next(tmp_path.glob(".latest_model.pth.*.tmp"))
    assert stale.stat().st_size > 0
    alive = tmp_path / f".best_model.pth.{os.getppid()}.tmp"  # a live process (another rank) may be writing it
    alive.write_bytes(b"being written")
    other = tmp_path / ".notes.tmp"
    other.write_bytes(b"not ours")
    assert load_checkpoint(tmp_path / "latest_model.pth")["epoch"] == 1
    assert not stale.exists() and alive.exists() and other.exists()


def test_a_checkpoint_write_removes_its_own_stale_temporary(tmp_path: Path) -> None:
    stale = tmp_path / f".latest_model.pth.{_dead_pid()}.tmp"
    stale.write_bytes(b"half")
    mine = tmp_path / f".latest_model.pth.{os.getpid()}.tmp"  # pid reuse in a container: this pid, long ago
    mine.write_bytes(b"half")
    save_checkpoint({"format": FORMAT}, tmp_path / "latest_model.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest_model.pth"]
    assert remove_stale_temporaries(tmp_path) == []


# load_encoder on wrong and malicious files

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("kind", ["missing", "text", "pickle", "checkpoint", "no_arch", "wrong_shapes"])
def test_load_encoder_on_a_wrong_or_malicious_file_is_one_line(tmp_path: Path, kind: str) -> None:
    from samft.export import FORMAT_VERSION, load_encoder

    path = tmp_path / "sam_encoder.pth"
    if kind == "text":
        path.write_text("hello")
    elif kind == "pickle":
        torch.save({"format_version": FORMAT_VERSION, "x": _Evil()}, path, pickle_module=pickle)
    elif kind == "checkpoint":
        save_checkpoint({"format": FORMAT, "model": {}}, path)
    elif kind == "no_arch":
        torch.save({"format_version": FORMAT_VERSION, "image_encoder_state_dict": {}}, path)
    elif kind == "wrong_shapes":
        torch.save({"format_version": FORMAT_VERSION,
                    "architecture": {"model_name": "sam_med3d_tiny", "visual_tokens": 32},
                    "image_encoder_state_dict": {"patch_embed.proj.weight": torch.zeros(1)},
                    "representation_head_state_dict": {}}, path)
    with pytest.raises(UserError) as err:
        load_encoder(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_insert_lesions_out_under_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    from samft.synth.cli import main

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "masks").mkdir()
    for out in (tmp_path / "file.txt" / "data", tmp_path / "file.txt"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--ct", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "masks"), "--out", str(out)])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"error: --out {out}") and "file" in stderr


# baseline: the same schema rules and the NaN refusal

def test_baseline_options_and_nan_scans(tmp_path: Path, capsys) -> None:
    import numpy as np
    from helpers.hardening import scan, tool_config, write_nifti

    from samft.baseline import BaselineConfig, run_baseline
    from samft.config import refuse_unknown_overrides

    for override, message in (("hu_min=nan", "'hu_min' is nan"), ("erode_mm=abc", "'erode_mm'"),
                              ("nonfinite=keep", "'nonfinite' is 'keep'"), ("+epochs=1", "unknown config key")):
        with pytest.raises(UserError, match=message):
            run_baseline(tool_config("baseline", f"input={tmp_path}", f"output={tmp_path / 'o'}", override))
    with pytest.raises(UserError, match="for samft.baseline; its keys: bone_hu"):
        refuse_unknown_overrides(["threshold=0.3"], BaselineConfig, tool="baseline")
    poisoned = scan()
    poisoned[3, 3, 3] = np.nan
    write_nifti(tmp_path / "in" / "a.nii.gz", scan())
    write_nifti(tmp_path / "in" / "b.nii.gz", poisoned)
    failures = run_baseline(tool_config("baseline", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"))
    assert len(failures) == 1 and "b.nii.gz" in failures[0] and "NaN or Inf" in failures[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_mask.nii.gz"]
    assert run_baseline(tool_config("baseline", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                                    "nonfinite=zero")) == []
