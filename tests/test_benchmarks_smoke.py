"""Every benchmark script runs on tiny sizes and prints its header and ratio lines; the shared helpers behave.

The scripts run as subprocesses (as users run them) with one torch thread, which is faster and steadier on a
loaded CPU. Their figures are not checked (benchmarks are not timed tests), only that they are produced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers.patience import patience

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RATIO = re.compile(r"^ratio .+ = \d+\.\d+x", re.MULTILINE)


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=patience(600), check=False)
    if check:
        assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "commit" in result.stdout and "machine" in result.stdout, result.stdout
    return result


def load(name: str) -> ModuleType:
    """A benchmark module imported from its file (benchmarks/ on sys.path for its `import common`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


# ---------------------------------------------------------------------------------------------- helpers
def test_ratio_line_states_the_ratio_and_whether_the_goal_is_met() -> None:
    common = load("common")
    assert common.ratio_line("t", 1.2, 1.0, unit="s", goal=1.3) == "ratio t: 1.2 s / 1 s = 1.200x (goal <= 1.3x: met)"
    assert common.ratio_line("t", 1.4, 1.0, unit="s", goal=1.3).endswith("= 1.400x (goal <= 1.3x: NOT met)")
    fast = common.ratio_line("speed", 3.0, 1.0, unit="samples/s", goal=2, higher_is_better=True)
    assert fast.endswith("= 3.000x (goal >= 2x: met)")
    assert common.ratio_line("m", 1.0, 4.0, unit="MiB") == "ratio m: 1 MiB / 4 MiB = 0.250x"


def test_peak_tree_memory_sees_a_child_process_allocation() -> None:
    common = load("common")
    code = "import time; block = b\"x\" * (300 * 2**20); time.sleep(1.5)"  # 300 MiB, written
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, "
                               f"'-c', {code!r}])"])
    with common.PeakTreeMemory(parent.pid, interval=0.1) as memory:
        parent.wait()
        time.sleep(0.2)
    assert memory.pss > 300 * 2**20


def test_gpu_plan_measures_the_goal_pair_first_and_matches_medim_rows() -> None:
    gpu = load("gpu")
    args = type("Args", (), {"quick": False, "batches": "1,2,4,8", "precisions": "fp32,bf16,fp16"})()
    rows = gpu.plan(args)
    assert len(rows) == 4 * 3 * len(gpu.FULL_VARIANTS)
    assert [(b, p, v.impl) for b, p, v in rows[:2]] == [(2, "bf16", "ours"), (2, "bf16", "medim")]
    assert [(b, p) for b, p, _ in rows[len(gpu.FULL_VARIANTS):][:1]] == [(1, "fp32")]
    quick = gpu.plan(type("Args", (), {"quick": True, "batches": "", "precisions": ""})())
    assert {(b, p, v.impl) for b, p, v in quick} == {(2, "bf16", "ours"), (2, "bf16", "medim"), (2, "fp32", "ours"),
                                                     (2, "fp32", "medim")}
    done = [{"impl": "medim", "status": "ok", "frozen": f, "batch": 2, "precision": "bf16"} for f in (False, True)]
    assert gpu.medim_row(done, {"frozen": True, "batch": 2, "precision": "bf16"}) is done[1]
    assert gpu.medim_row(done, {"frozen": True, "batch": 4, "precision": "bf16"}) is None


# ---------------------------------------------------------------------------------------------- scripts
def test_startup_smoke() -> None:
    out = run_script("startup.py", "--repeats", "1").stdout
    assert len(RATIO.findall(out)) == 3, out
    assert "samft.train --cfg job / minimal --cfg job" in out


@pytest.mark.slow
def test_loop_overhead_smoke_does_the_same_updates_as_the_bare_loop() -> None:
    out = run_script("loop_overhead.py", "--size", "tiny", "--rounds", "1", "--windows", "1",
                     "--precisions", "fp32").stdout
    for clock in ("wall time", "CPU time"):
        assert re.search(rf"^ratio samft Trainer / bare loop, fp32, {clock}: .+ = \d+\.\d+x", out, re.MULTILINE), out
    difference = float(re.search(r"max \|parameter difference\| .+ after \d+ epochs (\S+?);", out).group(1))
    assert difference == 0.0, out  # same model, data, clicks, optimiser: the Trainer adds no arithmetic


@pytest.mark.slow
def test_end_to_end_smoke() -> None:
    out = run_script("end_to_end.py", "--size", "tiny", "--configs", "none:1,memory:2").stdout
    assert "| none | 1 |" in out and "| memory | 2 |" in out, out
    assert len(RATIO.findall(out)) == 2, out


@pytest.mark.slow
def test_gpu_cpu_logic_path_writes_the_table(tmp_path: Path) -> None:
    out_json = tmp_path / "gpu.json"
    out = run_script("gpu.py", "--device", "cpu", "--size", "tiny", "--batches", "2", "--precisions", "bf16,fp16",
                     "--repeats", "1", "--warmup", "0", "--peak-tflops", "1", "--out", str(out_json)).stdout
    assert re.search(r"^ratio ours / medim samples/s, batch 2 bf16: .+ = \d+\.\d+x \(goal >= 2x", out, re.MULTILINE)
    report = json.loads(out_json.read_text())
    assert [r["status"] for r in report["rows"]] == ["ok"] * 10
    assert all(r["samples_per_s"] > 0 and r["mfu"] > 0 and r["peak_gib"] is None for r in report["rows"])
    assert report["gflop_per_sample"]["ours frozen"] < report["gflop_per_sample"]["ours trained"]
    assert "| ours | frozen | off | 2 | fp16 |" in out_json.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_without_cuda_exits_with_a_clear_message(tmp_path: Path) -> None:
    result = run_script("gpu.py", "--out", str(tmp_path / "gpu.json"), check=False)
    assert result.returncode == 1
    assert "no CUDA device is visible" in result.stderr and "--device cpu --size tiny" in result.stderr
    assert not (tmp_path / "gpu.json").exists()


# model_vs_medim.py runs once, in test_model_reference.py (equal outputs, speed-up and ratio lines)


@pytest.mark.slow
def test_preprocessing_smoke() -> None:
    out = run_script("preprocessing.py", "--size", "64", "--slices", "8", "--n", "2", "--epochs", "1",
                     "--caches", "memory").stdout
    assert len(re.findall(r"ratio cache=memory, .+ = \d+\.\d+x", out)) == 2, out


def test_empty_mask_plateau_smoke() -> None:
    out = run_script("empty_mask_plateau.py", "--steps", "2", "--every", "1", "--weights", "50").stdout
    curves = re.findall(r"^lesion_pos_weight (\S+): Dice every 1 updates ((?:\d\.\d\d ?)+)$", out, re.MULTILINE)
    assert [weight for weight, _ in curves] == ["1", "50"] and all(len(d.split()) == 3 for _, d in curves), out
    assert "ratio weight 50 / weight 1, updates to Dice 0.5" in out


def test_upsampling_smoke_compares_every_size_with_f_interpolate() -> None:
    out = run_script("upsampling.py", "--repeats", "1").stdout
    ratio = r"^ratio (\d+)\^3 -> (\d+)\^3 trilinear_resize / F.interpolate: .+ = \d+\.\d+x$"
    ratios = re.findall(ratio, out, re.MULTILINE)
    assert ratios == [("32", "128"), ("64", "128"), ("32", "64")], out
    differences = [float(d) for d in re.findall(r"largest difference (\S+) \(output\)", out)]
    assert len(differences) == 3 and max(differences) < 1e-5, out



def test_refinement_head_smoke_compares_the_split_convolution_with_the_concatenation() -> None:
    out = run_script("refinement_head.py", "--size", "64", "--repeats", "1").stdout
    assert re.search(r"^ratio training step, split first convolution / UNet on the concatenation: .+ = \d+\.\d+x$",
                     out, re.MULTILINE), out
    split, plain = (float(v) for v in re.search(r"^loss (\S+) \(split\) / (\S+) \(concatenation\)", out,
                                                re.MULTILINE).groups())
    difference, largest = (float(v) for v in re.search(r"difference (\S+) of largest (\S+)$", out,
                                                       re.MULTILINE).groups())
    assert abs(split - plain) < 1e-4 and difference < 1e-5 * largest, out


def test_refine_crop_smoke_compares_the_box_step_with_the_whole_crop_and_the_cell_mlp() -> None:
    out = run_script("refine_crop.py", "--size", "64", "--box", "32", "--repeats", "1").stdout
    assert re.search(r"^ratio training step, box / whole crop: .+ = \d+\.\d+x$", out, re.MULTILINE), out
    assert re.search(r"^ratio training step, box \+ cell MLP / box: .+ = \d+\.\d+x$", out, re.MULTILINE), out
    assert "whole crop: logits (2, 1, 64, 64, 64)" in out and "box: logits (2, 1, 32, 32, 32)" in out, out
    assert "box + cell MLP: logits (2, 1, 32, 32, 32)" in out, out

def test_optimizer_smoke_compares_fused_adamw_with_the_default() -> None:
    out = run_script("optimizer.py", "--repeats", "2").stdout
    assert re.search(r"^ratio AdamW step, fused / default: .+ = \d+\.\d+x$", out, re.MULTILINE), out
    difference = float(re.search(r"^largest weight difference after 2 updates: (\S+)$", out, re.MULTILINE)[1])
    assert difference < 1e-7, out  # the same update up to float rounding


def test_loader_cpu_smoke_yields_the_same_batches_as_before() -> None:
    out = run_script("loader_cpu.py", "--size", "96", "--slices", "12", "--roi", "32", "--n", "3",
                     "--epochs", "2").stdout
    assert re.search(r"^ratio loader worker CPU per batch, samft / before: .+ = \d+\.\d+x$", out, re.MULTILINE), out
    assert "same batches once the label is cast: True" in out, out


@pytest.mark.slow
def test_gpu_smoke_runs_every_check_with_a_cpu_form_into_one_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu_smoke.json"
    result = run_script("gpu_smoke.py", "--device", "cpu", "--out", str(out), check=False)
    report = json.loads(out.read_text())
    failed = {name: check.get("error") for name, check in report["checks"].items() if check["status"] == "failed"}
    assert result.returncode == 0 and not failed, failed or result.stderr[-3000:]
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert statuses == {"pytest_gpu": "skipped", **{name: "passed" for name in statuses if name != "pytest_gpu"}}
    assert len(statuses) == 9  # its time is measured by the script (~70 s here), never asserted in a test
    assert report["checks"]["seeded_runs"]["bit_equal"] is True
    assert report["checks"]["ddp_oom"]["events"]["skipped_steps"] == 1
    assert report["checks"]["gpu_benchmark"]["report"]
    if not torch.cuda.is_available():
        refused = run_script("gpu_smoke.py", "--out", str(tmp_path / "none.json"), check=False)
        assert refused.returncode == 1 and "--device cpu" in refused.stderr


@pytest.mark.slow
def test_cpu_threads_smoke_gives_each_run_its_thread_setting(tmp_path: Path) -> None:
    from samft.data.datamodule import default_num_workers
    from samft.data.demo import ensure_demo_dataset
    from samft.devices import available_cpus

    demo, out_dir = tmp_path / "demo", tmp_path / "out"
    ensure_demo_dataset(root=demo, n_patients=4, seed=0)
    extra = (f"data.demo_dir={demo} data.demo_patients=4 data.batch_size=1 data.roi_size=[32,32,16] "
             "hardware.num_workers=1")
    out = run_script("cpu_threads.py", "--steps", "1", "--rounds", "1", "--out", str(out_dir), "--extra", extra).stdout
    spared = max(1, available_cpus() - default_num_workers())
    runs = re.findall(r"^  run (demo-[AB]0): hardware\.cpu_threads=(\S+) -> cpu_threads (\d+), loader_workers 1: "
                      r"\d+\.\d+ samples/s", out, re.MULTILINE)
    assert [(name, setting) for name, setting, _ in runs] == [("demo-A0", str(spared)), ("demo-B0", "null")], out
    assert re.search(rf"^ratio experiment=demo, train samples/s, cpu_threads=null / cpu_threads={spared}: .+ = "
                     r"\d+\.\d+x$", out, re.MULTILINE), out
    # each run's own record: a core spared per default worker as given, and samft's default of all usable CPUs
    # (the benchmark's scans are cached, so the loader worker is light)
    for name, given, in_force in (("demo-A0", spared, spared), ("demo-B0", None, available_cpus())):
        config = json.loads((out_dir / name / "config.json").read_text())
        summary = json.loads((out_dir / name / "summary.json").read_text())
        assert config["hardware"]["cpu_threads"] == given and summary["loader_workers"] == 1
        assert summary["cpu_threads"] == in_force, (name, summary["cpu_threads"])
    report = json.loads((out_dir / "report.json").read_text())
    assert [run["cpu_threads"] for run in report["runs"]] == [spared, available_cpus()]


def test_cpu_threads_realistic_without_its_data_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "no-ich-data"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_threads.py"), "--recipe", "realistic", "--out",
                             str(tmp_path / "out")], cwd=REPO, env={**os.environ, "SAMFT_ICH_DATA": str(missing)},
                            capture_output=True, text=True, timeout=patience(120), check=False)
    assert result.returncode == 1 and f"skipped: no realistic ICH data at {missing}" in result.stderr, result.stderr
    assert "SAMFT_ICH_DATA" in result.stderr and not (tmp_path / "out").exists()


def test_resampling_smoke_compares_samft_preprocessing_with_float64() -> None:
    out = run_script("resampling.py", "--size", "64", "--slices", "8", "--repeats", "1").stdout
    ratio = r"^ratio preprocessing one scan, samft \(float32\) / float64: .+ = \d+\.\d+x$"
    assert re.search(ratio, out, re.MULTILINE), out
    assert "largest image difference" in out, out
