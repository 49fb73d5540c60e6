"""Exact gradient accumulation: k micro-batches make the same update as one batch of their samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.standin import TinySegmenter, assert_params_close, make_trainer, params, settings
from torch.nn.parallel import DistributedDataParallel

from samft.engine import LATEST, load_checkpoint

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _train(tmp_path: Path, name: str, *, batch_size: int, accum: int, n_train: int, **kw) -> dict:
    trainer = make_trainer(
        tmp_path / name,
        batch_size=batch_size,
        n_train=n_train,
        train_settings=settings(epochs=1, grad_accum_steps=accum, train_clicks=1, **kw),
    )
    summary = trainer.fit()
    return {"params": params(trainer.model), "steps": summary["global_step"]}


@pytest.mark.parametrize(
    ("n_train", "micro", "accum", "whole"),
    [
        (4, 1, 4, 4),  # batch_size=1 x 4 == batch_size=4 x 1
        (6, 1, 4, 4),  # partial last window: 4 + 2 micro-batches vs batches of 4 and 2
        (5, 3, 2, 5),  # unequal micro-batches (3 + 2) in one window vs one batch of 5
    ],
)
def test_accumulated_update_equals_large_batch_update(
    tmp_path: Path, n_train: int, micro: int, accum: int, whole: int
) -> None:
    accumulated = _train(tmp_path, "accumulated", batch_size=micro, accum=accum, n_train=n_train, max_grad_norm=0.5)
    single = _train(tmp_path, "single", batch_size=whole, accum=1, n_train=n_train, max_grad_norm=0.5)
    assert accumulated["steps"] == single["steps"] == -(-n_train // whole)
    assert_params_close(accumulated["params"], single["params"], **TOL)
    torch.manual_seed(0)
    initial = params(TinySegmenter())
    assert not torch.equal(initial["decoder.weight"], single["params"]["decoder.weight"])  # an update happened


def test_clipping_scales_the_update_to_max_grad_norm(tmp_path: Path) -> None:
    """SGD at lr 0.1 without momentum: one update is -0.1 x the clipped gradient, so its norm is 0.1 x max_grad_norm
    when the gradient is longer than that, and 0.1 x the gradient's own norm without clipping."""
    def update_norm(max_grad_norm: float | None) -> float:
        trainer = make_trainer(tmp_path / str(max_grad_norm), n_train=2,
                               train_settings=settings(epochs=1, train_clicks=1, max_grad_norm=max_grad_norm))
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        assert trainer.fit()["global_step"] == 1
        after = dict(trainer.model.named_parameters())
        return float(torch.cat([(after[k].detach() - before[k]).flatten() for k in before]).norm())

    assert update_norm(None) > 0.1 * 1e-3 * 10  # the gradient is longer than the limit below
    assert update_norm(1e-3) == pytest.approx(0.1 * 1e-3, rel=1e-3)


def test_prompt_free_mode_accumulates_exactly_too(tmp_path: Path) -> None:
    accumulated = _train(tmp_path, "a", batch_size=1, accum=2, n_train=2, prompt_mode="auto", val_clicks=(1,))
    single = _train(tmp_path, "s", batch_size=2, accum=1, n_train=2, prompt_mode="auto", val_clicks=(1,))
    assert accumulated["steps"] == single["steps"] == 1
    assert_params_close(accumulated["params"], single["params"], **TOL)
    torch.manual_seed(0)
    initial = params(TinySegmenter())
    assert not torch.equal(initial["decoder.weight"], single["params"]["decoder.weight"])  # an update happened


def test_ddp_syncs_only_on_the_last_micro_step_and_saves_unprefixed_keys(tmp_path: Path) -> None:
    """One gloo process: the wrapper is called (not bypassed), no_sync covers all but the last micro-step,
    the update equals the unwrapped run, and the checkpoint keys carry no `module.` prefix."""
    reference = _train(tmp_path, "plain", batch_size=1, accum=4, n_train=4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        wrapped = DistributedDataParallel(TinySegmenter())
        entered = []
        original = wrapped.no_sync

        def counting_no_sync():
            entered.append(True)
            return original()

        wrapped.no_sync = counting_no_sync
        trainer = make_trainer(
            tmp_path / "ddp",
            model=wrapped,
            batch_size=1,
            n_train=4,
            train_settings=settings(epochs=1, grad_accum_steps=4, train_clicks=1),
        )
        trainer.fit()
    finally:
        dist.destroy_process_group()
    assert len(entered) == 3  # micro-steps 1-3 of the single window; the 4th synchronises
    trained = params(wrapped.module)
    assert_params_close(trained, reference["params"], **TOL)
    saved = load_checkpoint(tmp_path / "ddp" / LATEST)["model"]
    assert not any(key.startswith("module.") for key in saved)
    assert_params_close(dict(saved), trained, rtol=0, atol=0)
