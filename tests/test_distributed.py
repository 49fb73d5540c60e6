"""torch.distributed on CPU (gloo): DDP == one process with the same global batch, exact DDP resume, validation
reduced across ranks, rank 0 alone writing; sweep workers sharing one Optuna storage; whole runs (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.patience import patience
from helpers.standin import TinySegmenter, assert_params_close, make_cases, params, settings
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from samft import distributed
from samft.config import TrainConfig
from samft.engine import LATEST, Trainer, build_scheduler, load_checkpoint
from samft.engine.checkpoint import unwrap
from samft.engine.faults import inject_faults, out_of_memory_on
from samft.errors import UserError
from samft.runner import _freeze_heads_without_loss, _train_spawned

WORLD = 2
TOL = {"rtol": 1e-5, "atol": 1e-6}
APP = Path(__file__).resolve().parent / "sweep_app" / "app.py"
# the 2-rank runs: settings and loader batch size per rank; the one-process references use WORLD x the batch
EQUAL = {"settings": {"epochs": 2, "grad_accum_steps": 2, "prompt_mode": "auto", "val_clicks": (1,),
                     "ich_loss_weight": 0.0}, "batch": 2}
VALIDATE = {"settings": {"epochs": 1, "val_clicks": (1, 2)}, "batch": 2, "lr": 0.0, "n_val": 6}
RESUME = {"settings": {"epochs": 2, "grad_accum_steps": 2, "max_grad_norm": 1.0}, "batch": 2, "optimizer": "adamw"}


class WithUnusedHead(TinySegmenter):
    """The stand-in plus a head that never reaches the loss, like SAM's extra mask-token hypernetworks."""

    def __init__(self) -> None:
        super().__init__()
        self.unused_head = nn.Linear(4, 1)


class SometimesUsed(TinySegmenter):
    """The stand-in plus a bias added to the logits of cases with a lesion only: a micro-batch without one leaves
    it out of the graph, like SAM's embedding of negative clicks. Per-case, so any batching gives the same loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lesion_bias = nn.Parameter(torch.zeros(()))

    def segment(self, image: torch.Tensor, *, target: torch.Tensor | None = None, **kwargs: Any):
        out = super().segment(image, target=target, **kwargs)
        positive = target.flatten(1).any(1)[:, None, None, None, None]
        if positive.any():
            out.logits = [torch.where(positive, logits + self.lesion_bias, logits) for logits in out.logits]
        return out


def build_trainer(
    run_dir: Path, *, settings_kw: dict, batch: int, world: int, lr: float = 0.1, optimizer: str = "sgd",
    n_train: int = 16, n_val: int = 4, model_cls: type[nn.Module] = TinySegmenter, **trainer_kw: Any,
) -> Trainer:
    """A Trainer on the stand-in; with a process group up the model is DDP-wrapped and the train set sharded.

    The shuffle is DistributedSampler's permutation for (seed 0, epoch) in every case, so WORLD ranks with
    `batch` each see, window by window, the samples one process sees with WORLD x `batch`."""
    train_settings = settings(**settings_kw)
    torch.manual_seed(0)
    model = model_cls()
    _freeze_heads_without_loss(model, ich_loss_weight=train_settings.ich_loss_weight)  # as the runner does
    cases = make_cases(n_train, seed=1)
    sampler = DistributedSampler(cases, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=0)
    train = DataLoader(cases, batch_size=batch, sampler=sampler)
    val = DataLoader(make_cases(n_val, seed=2), batch_size=2)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = -(-len(train) // train_settings.grad_accum_steps)
    schedule = build_scheduler("step", opt, epochs=train_settings.epochs, steps_per_epoch=steps, step_size=100)
    unused = model_cls in (WithUnusedHead, SometimesUsed)
    wrapped = distributed.wrap_model(model, device=torch.device("cpu"), find_unused_parameters=unused)
    return Trainer(model=wrapped, optimizer=opt, schedule=schedule, train_loader=train, val_loader=val,
                   settings=train_settings, run_dir=run_dir, resolved_config={"seed": 0}, **trainer_kw)


def _interrupt_rank1_in_epoch_2(trainer: Trainer) -> None:
    """SIGINT on rank 1 alone, during the first micro-batch of epoch 2 (4 micro-batches per epoch and rank)."""
    model = unwrap(trainer.model)
    segment, calls = model.segment, {"n": 0}

    def segment_then_interrupt(image: torch.Tensor, **kwargs: Any):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 4 + 1:
                signal.raise_signal(signal.SIGINT)
        return segment(image, **kwargs)

    model.segment = segment_then_interrupt


def ranks_body(out: str) -> int:
    """What each of the WORLD gloo ranks runs (spawned by samft.distributed.spawn); writes its results."""
    out, rank = Path(out), distributed.rank()

    def record(name: str, trainer: Trainer, summary: dict) -> None:
        torch.save({"params": params(unwrap(trainer.model)), "summary": summary}, out / f"{name}_rank{rank}.pt")

    # rank 1 gets its own folder, which must stay empty: rank 0 alone writes
    equal = build_trainer(out / f"equal_{rank}", settings_kw=EQUAL["settings"], batch=EQUAL["batch"], world=WORLD,
                          model_cls=SometimesUsed)
    record("equal", equal, equal.fit())

    check = build_trainer(out / "validate", settings_kw=VALIDATE["settings"], batch=VALIDATE["batch"],
                          world=WORLD, lr=VALIDATE["lr"], n_val=VALIDATE["n_val"])
    record("validate", check, check.fit())

    kwargs = {"settings_kw": RESUME["settings"], "batch": RESUME["batch"], "optimizer": RESUME["optimizer"],
              "world": WORLD, "model_cls": WithUnusedHead}
    full = build_trainer(out / "full", **kwargs)
    record("full", full, full.fit())
    first = build_trainer(out / "resumed", **kwargs)
    if rank == 1:
        _interrupt_rank1_in_epoch_2(first)
    record("interrupted", first, first.fit())
    if rank == 0:
        shutil.copy(out / "resumed" / LATEST, out / "mid_epoch.pth")
    torch.distributed.barrier()  # rank 1 resumes from the file rank 0 has just written
    second = build_trainer(out / "resumed", **kwargs)
    record("resumed", second, second.fit(resume_from=out / "resumed" / LATEST))
    return rank


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    assert distributed.spawn(ranks_body, args=(str(out),), nprocs=WORLD, backend="gloo", timeout_min=5) == 0
    return out


def result(out: Path, name: str, rank: int) -> dict[str, Any]:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def _deterministic(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "memory/"))} for h in history]


def test_ddp_ranks_hold_the_weights_of_one_process_with_the_global_batch(ranks: Path, tmp_path: Path) -> None:
    rank0, rank1 = result(ranks, "equal", 0), result(ranks, "equal", 1)
    assert_params_close(rank0["params"], rank1["params"], rtol=0, atol=0)
    single = build_trainer(tmp_path, settings_kw=EQUAL["settings"], batch=WORLD * EQUAL["batch"], world=1,
                           model_cls=SometimesUsed)
    summary = single.fit()
    assert summary["global_step"] == rank0["summary"]["global_step"] == 4  # 2 epochs x 2 windows
    assert_params_close(rank0["params"], params(single.model), **TOL)
    torch.manual_seed(0)
    initial = params(SometimesUsed())
    for name in ("decoder.weight", "lesion_bias"):  # lesion_bias: no gradient in some micro-batches of a rank
        assert not torch.equal(initial[name], rank0["params"][name])
    # ich_loss_weight=0: the ICH head, whose logit the model still returns, is frozen rather than awaited by DDP
    assert torch.equal(initial["ich_head.weight"], rank0["params"]["ich_head.weight"])
    # the epoch's train loss is the mean over both ranks' samples
    for ddp, one in zip(rank0["summary"]["history"], summary["history"], strict=True):
        assert ddp["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5)


def test_rank0_alone_writes_the_run_directory(ranks: Path) -> None:
    assert {p.name for p in (ranks / "equal_0").iterdir()} >= {LATEST, "summary.json", "training_curves.png"}
    assert list((ranks / "equal_1").iterdir()) == []


def test_validation_metrics_gathered_over_ranks_equal_one_process(ranks: Path, tmp_path: Path) -> None:
    """Three validation batches: rank 0 scores batches 0 and 2, rank 1 batch 1, with the same clicks as one
    process (clicks are seeded per batch); both ranks report the metrics of all cases."""
    single = build_trainer(tmp_path, settings_kw=VALIDATE["settings"], batch=WORLD * VALIDATE["batch"], world=1,
                           lr=VALIDATE["lr"], n_val=VALIDATE["n_val"]).fit()
    expected = {k: v for k, v in single["history"][0].items() if k.startswith("val/")}
    assert expected["val/n_pos"] + expected["val/n_neg"] == VALIDATE["n_val"]
    for rank in range(WORLD):
        record = result(ranks, "validate", rank)["summary"]["history"][0]
        got = {k: v for k, v in record.items() if k.startswith("val/")}
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-6)


def test_ctrl_c_on_one_rank_stops_both_and_the_ddp_resume_continues_exactly(ranks: Path) -> None:
    for rank in range(WORLD):
        assert result(ranks, "interrupted", rank)["summary"]["stop_reason"] == "interrupted"
    state = load_checkpoint(ranks / "mid_epoch.pth")
    assert state["epoch"] == 1 and state["global_step"] == 3  # the window running at the Ctrl-C completed
    assert [r["position"]["batches_done"] for r in state["ranks"]] == [2, 2]
    assert not torch.equal(state["ranks"][0]["rng"]["clicks"], state["ranks"][1]["rng"]["clicks"])
    full = result(ranks, "full", 0)
    for rank in range(WORLD):
        resumed = result(ranks, "resumed", rank)
        assert resumed["summary"]["stop_reason"] == "completed"
        assert _deterministic(resumed["summary"]["history"]) == _deterministic(full["summary"]["history"])
        assert_params_close(resumed["params"], full["params"], rtol=0, atol=0)
    torch.manual_seed(0)
    assert torch.equal(full["params"]["unused_head.weight"], params(WithUnusedHead())["unused_head.weight"])


def test_a_mid_epoch_ddp_checkpoint_refuses_another_number_of_processes(ranks: Path, tmp_path: Path) -> None:
    trainer = build_trainer(tmp_path, settings_kw=RESUME["settings"], batch=RESUME["batch"],
                            optimizer=RESUME["optimizer"], world=1, model_cls=WithUnusedHead)
    with pytest.raises(UserError, match="saved mid-epoch by 2 processes"):
        trainer.fit(resume_from=ranks / "mid_epoch.pth")


@pytest.mark.slow
def test_a_user_error_on_rank0_ends_the_waiting_rank_and_reaches_the_parent_as_itself(tmp_path: Path) -> None:
    """Rank 0 fails reading the data while rank 1 waits for its records: the parent stops rank 1 and raises the
    UserError (one line for the entry point), not a traceback or a hang."""
    config = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    config["data"].update(source="csv", train_csv=str(tmp_path / "none.csv"), val_csv=str(tmp_path / "none.csv"),
                          mask_dir=str(tmp_path))
    with pytest.raises(UserError, match="none.csv"):
        distributed.spawn(_train_spawned, args=(config, str(tmp_path / "run")), nprocs=WORLD, backend="gloo",
                          timeout_min=patience(1))
    assert not (tmp_path / "run" / "summary.json").exists()


class WithBuffer(TinySegmenter):
    """The stand-in plus a buffer in the forward, like SAM's positional-encoding matrix: DDP broadcasts buffers
    from rank 0 before a forward that follows a synchronising one (broadcast_buffers, on by default)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("image_scale", torch.ones(()))

    def segment(self, image: torch.Tensor, **kwargs: Any):
        return super().segment(image * self.image_scale, **kwargs)


OOM = {"settings": {"epochs": 1, "grad_accum_steps": 2}, "batch": 2, "n_train": 24}  # 3 windows of 2 per rank


def oom_body(out: str) -> int:
    """Rank 1 runs out of memory in the forward of window 2's first micro-step; rank 0 does not."""
    rank = distributed.rank()
    trainer = build_trainer(Path(out) / f"oom_{rank}", settings_kw=OOM["settings"], batch=OOM["batch"], world=WORLD,
                            n_train=OOM["n_train"], model_cls=WithBuffer)
    model = unwrap(trainer.model)
    if rank == 1:
        inject_faults(model, out_of_memory_on(3))
    summary = trainer.fit()
    torch.save({"params": params(model), "summary": summary}, Path(out) / f"oom_rank{rank}.pt")
    return rank


def world_sum_body() -> float:
    """Each rank contributes rank + 1; every rank returns the all-reduced sum."""
    value = torch.tensor([distributed.rank() + 1.0])
    torch.distributed.all_reduce(value)
    return value.item()


def test_spawned_ranks_meet_without_a_port_chosen_in_advance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port picked free by the parent and bound later by rank 0 can be taken in between by another process.
    Here the parent cannot bind any port at all, and the ranks still meet; their rendezvous folder is removed."""

    def no_port(sock: socket.socket, address: Any) -> None:
        raise OSError(98, f"address already in use: {address}")

    monkeypatch.setattr(socket.socket, "bind", no_port)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert distributed.spawn(world_sum_body, nprocs=WORLD, backend="gloo", timeout_min=patience(1.0)) == 3.0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_oom_in_one_ranks_forward_skips_the_window_on_both_and_they_stay_in_step(tmp_path: Path) -> None:
    """The OOM leaves DDP's buffer-sync flag of rank 1 as the previous window set it: without a reset, rank 1
    broadcasts buffers before window 3 while rank 0 waits in another collective (a hang or a crash on NCCL)."""
    assert distributed.spawn(oom_body, args=(str(tmp_path),), nprocs=WORLD, backend="gloo",
                              timeout_min=patience(0.5)) == 0
    ranks = [result(tmp_path, "oom", rank) for rank in range(WORLD)]
    for got in ranks:
        assert got["summary"]["global_step"] == 2 and got["summary"]["events"]["skipped_steps"] == 1
    assert ranks[1]["summary"]["events"]["oom"] == 1
    # the throughput is the job's (summed over ranks), the same on both, not each rank's own
    rates = [got["summary"]["history"][0]["time/samples_per_s"] for got in ranks]
    assert rates[0] == rates[1] > 0
    assert_params_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    torch.manual_seed(0)
    assert not torch.equal(params(WithBuffer())["decoder.weight"], ranks[0]["params"]["decoder.weight"])


def test_backend_choice() -> None:
    assert distributed.backend_for("auto", "cuda") == "nccl"
    assert distributed.backend_for("auto", "cpu") == "gloo"
    with pytest.raises(UserError, match="nccl needs GPUs"):
        distributed.backend_for("nccl", "cpu")


def test_a_multi_task_submitit_job_gives_each_task_its_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM job with 4 tasks on 2 nodes, seen from task 3: submitit's variables become torchrun's."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    plain = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    monkeypatch.setattr(os, "environ", {**plain, **slurm})
    assert distributed.external_launcher() == "submitit"
    distributed.export_submitit_environment()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == ["3", "4", "1", "gpu07"]
    assert distributed.external_launcher() == "torchrun"


def test_the_slurm_launcher_config_runs_one_task_per_gpu() -> None:
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (declared in the dev extra: no skip)
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hardware=ddp", "hardware.nproc_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 1)
    assert launcher.max_num_timeout > 0 and cfg.resume == "auto"  # a requeued job continues its trial


# ---------------------------------------------------------------------------------------------- sweeps
def test_two_sweep_workers_sharing_one_storage_run_disjoint_trials(tmp_path: Path) -> None:
    import optuna

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    # Optuna 2.10 races when two processes create a fresh storage's tables: initialise it once, as the README says
    optuna.create_study(study_name="app", storage=storage, direction="maximize")
    workers = [
        subprocess.Popen(
            [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp_path / name}", f"hydra.sweeper.storage={storage}",
             "hydra.sweeper.sampler.seed=null", "hydra.sweeper.pruner=none", "hydra.sweeper.n_trials=3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in ("worker_a", "worker_b")
    ]
    outputs = [w.communicate(timeout=patience(300))[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    trials = optuna.load_study(study_name="app", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    ran = [{int(p.name.removeprefix("trial_")) for p in (tmp_path / name).glob("trial_*")}
           for name in ("worker_a", "worker_b")]
    assert len(ran[0]) == len(ran[1]) == 3 and not ran[0] & ran[1]
    assert ran[0] | ran[1] == set(range(6))
    assert all(t.value == pytest.approx(t.params["x"]) for t in trials)


# ---------------------------------------------------------------------------------------------- whole runs
def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=patience(900), cwd=cwd,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# on CPU (gloo) even where a GPU is visible: NCCL would refuse two ranks on a one-GPU machine
SMOKE_DDP = ("experiment=smoke", "hardware=ddp", "hardware.nproc_per_node=2", "hardware.precision=fp32",
             "hardware.device=cpu")


@pytest.mark.slow
def test_a_sweep_trial_spawns_its_ranks_and_reports_rank0s_objective(tmp_path: Path) -> None:
    """`-m` with hardware=ddp: the trial's job spawns 2 gloo workers; one run directory; Optuna gets rank 0's
    best metric and the per-epoch values its pruning callback reported."""
    import optuna

    run("-m", "samft.train", "-m", *SMOKE_DDP, "hparams_search=ich_optuna", "hparams_search.n_trials=1", "epochs=1",
        f"output_dir={tmp_path}", f"data.demo_dir={tmp_path / 'demo'}", cwd=tmp_path)
    sweep = tmp_path / "sweeps" / "ich_optuna"
    assert [p.parent for p in tmp_path.rglob("summary.json")] == [sweep / "trial_0"]
    run_dir = sweep / "trial_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["stop_reason"] == "completed"
    for name in ("best_model.pth", "sam_encoder.pth", "stats.json", "config.json", "training_curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "train.log").read_text().count("run finished") == 1  # rank 1 logs warnings to the console only
    [trial] = optuna.load_study(study_name="ich_optuna", storage=f"sqlite:///{sweep / 'optuna.db'}").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.value == pytest.approx(summary["best_metric"])
    assert list(trial.intermediate_values) == [1]


@pytest.mark.slow
def test_torchrun_ranks_agree_on_rank0s_run_directory(tmp_path: Path) -> None:
    """Each torchrun rank composes its own run directory (here one per rank on purpose): rank 0's is used and
    the other rank's Hydra-only folder is removed."""
    proc = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "samft.train", *SMOKE_DDP,
               "epochs=1", f"output_dir={tmp_path}", f"data.demo_dir={tmp_path / 'demo'}",
               "hydra.run.dir=${output_dir}/run_rank${oc.env:RANK}", cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("run_rank*")) == ["run_rank0"]
    run_dir = tmp_path / "run_rank0"
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 1
    assert (run_dir / "sam_encoder.pth").stat().st_size > 0
    assert (run_dir / "train.log").read_text().count("run finished") == 1
    assert proc.stdout.count("run directory:") == 1


def test_torchrun_with_a_multirun_is_refused_before_any_process_group(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """torchrun -m samft.train -m ... would run one whole sweep per rank: one line instead."""
    import samft.runner as runner

    config = OmegaConf.structured(TrainConfig)
    config.hardware.device, config.hardware.distributed = "cpu", True
    monkeypatch.setattr(os, "environ", {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    monkeypatch.setattr(runner, "in_multirun", lambda: True)
    with pytest.raises(UserError, match="torchrun with -m runs one sweep per rank"):
        runner._train_distributed(config, tmp_path)
    assert not distributed.is_active()
    monkeypatch.setattr(runner, "in_multirun", lambda: False)  # a single run goes on to join the group
    monkeypatch.setattr(distributed, "process_group", lambda **kw: (_ for _ in ()).throw(RuntimeError("joins")))
    with pytest.raises(RuntimeError, match="joins"):
        runner._train_distributed(config, tmp_path)
