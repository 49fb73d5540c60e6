"""Resume across device counts and kinds: random states saved on other hardware restore as far as they fit
(fake CUDA states and a fake CUDA generator on CPU), at the stated cost of bit-exactness."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers.standin import make_trainer, settings

from samft.engine import LATEST, load_checkpoint, save_checkpoint
from samft.engine.checkpoint import capture_rng, restore_rng

PHILOX_STATE_BYTES = 16  # a CUDA generator's state: seed and offset; a CPU one is 5056 bytes


class FakeCudaGenerator:
    """What restore_rng uses of a CUDA torch.Generator: its device, a 16-byte state that refuses other sizes."""

    device = torch.device("cuda")

    def __init__(self) -> None:
        self.state = torch.zeros(PHILOX_STATE_BYTES, dtype=torch.uint8)
        self.seed: int | None = None

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        if state.numel() != PHILOX_STATE_BYTES:
            raise RuntimeError("RNG state is wrong size")  # as torch says for a CPU state on a CUDA generator
        self.state = state.clone()

    def manual_seed(self, seed: int) -> FakeCudaGenerator:
        self.seed = seed
        return self


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, torch.Tensor]]:
    """One visible fake GPU; records the CUDA RNG states set on it."""
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: restored.append((device, state)))
    return restored


def _cpu_state() -> dict:
    return capture_rng(torch.Generator().manual_seed(3))


def test_a_state_saved_on_two_gpus_restores_on_one(fake_gpus, caplog: pytest.LogCaptureFixture) -> None:
    state = _cpu_state()
    state["cuda"] = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING):
        assert restore_rng(state, torch.Generator()) is False
    assert [device for device, _ in fake_gpus] == [0] and torch.equal(fake_gpus[0][1], state["cuda"][0])
    assert "2 CUDA device(s), 1 visible" in caplog.text and "not bit-exact" in caplog.text


def test_a_cpu_state_restores_on_cuda_and_a_cuda_state_on_cpu(fake_gpus, caplog: pytest.LogCaptureFixture) -> None:
    cpu_saved = _cpu_state()  # no CUDA states, a 5056-byte click state
    generator = FakeCudaGenerator()
    with caplog.at_level(logging.WARNING):
        assert restore_rng(cpu_saved, generator) is False
    assert fake_gpus == [] and generator.seed is not None and "click-generator state" in caplog.text
    again = FakeCudaGenerator()
    restore_rng(cpu_saved, again)
    assert again.seed == generator.seed  # the same checkpoint re-seeds the same way

    cuda_saved = {**cpu_saved, "clicks": torch.arange(PHILOX_STATE_BYTES, dtype=torch.uint8), "cuda": [torch.ones(8)]}
    draws = []
    for _ in range(2):
        clicks = torch.Generator()
        restore_rng(cuda_saved, clicks)
        draws.append(torch.rand(3, generator=clicks))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_an_exact_restore_says_so() -> None:
    clicks = torch.Generator().manual_seed(5)
    state = capture_rng(clicks)
    expected = torch.rand(4, generator=clicks)
    assert restore_rng(state, clicks) is True  # captured and restored on the same hardware
    torch.testing.assert_close(torch.rand(4, generator=clicks), expected, rtol=0, atol=0)


def test_a_trainer_resumes_a_checkpoint_written_on_gpus(tmp_path: Path) -> None:
    """A run saved on 2 GPUs (CUDA click generator, 2 CUDA states) continues on the CPU."""
    make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=1)).fit()
    state = load_checkpoint(tmp_path / LATEST)
    state["rng"]["clicks"] = torch.arange(PHILOX_STATE_BYTES, dtype=torch.uint8)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2
    save_checkpoint(state, tmp_path / LATEST)
    summary = make_trainer(tmp_path, n_train=4, train_settings=settings(epochs=2)).fit(resume_from=tmp_path / LATEST)
    assert summary["epochs_run"] == 2 and summary["global_step"] == 4 and summary["stop_reason"] == "completed"
