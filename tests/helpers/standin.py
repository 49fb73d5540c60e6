"""A tiny stand-in for the SAM model (same `segment` API, no batch-dependent layers) and data for engine tests.

`tests/test_engine_standin.py` checks that the stand-in honours the model contract the engine relies on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from samft.engine import Schedule, Trainer, TrainSettings, build_scheduler
from samft.model.sam3d import SegmentOutput

SIZE = 16


class TinySegmenter(nn.Module):
    """Conv encoder, a decoder fed with features + click map + previous mask, and a linear ICH head.

    Clicks follow the contract: first a uniform voxel of the target, then a uniform voxel of the previous
    round's error region (+1 for a miss, -1 for a false alarm), drawn per sample in batch order: with one click
    round, a batch and its consecutive parts draw the same clicks.
    """

    ich_heads = ("ich_head",)  # as SamMed3D declares its: frozen by the runner when ich_loss_weight=0

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Conv3d(1, channels, 3, padding=1)
        self.decoder = nn.Conv3d(channels + 2, 1, 3, padding=1)
        self.ich_head = nn.Linear(channels, 1)

    def forward(self, image: torch.Tensor, **kwargs: Any) -> SegmentOutput:
        return self.segment(image, **kwargs)

    def segment(
        self,
        image: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        num_clicks: int,
        generator: torch.Generator | None = None,
        prompt_free: bool = False,
    ) -> SegmentOutput:
        features = torch.relu(self.encoder(image))
        clicks = torch.zeros_like(image)
        previous = torch.zeros_like(image)
        logits = []
        for _ in range(max(num_clicks, 1)):
            if num_clicks > 0 and target is not None:
                clicks = clicks + self._click(target, previous, generator)
            out = self.decoder(torch.cat([features, clicks, previous], dim=1))
            logits.append(out)
            previous = (torch.sigmoid(out) > 0.5).float().detach()
        ich_logit = self.ich_head(features.mean(dim=(2, 3, 4))).squeeze(1)
        unprompted = None
        if prompt_free and num_clicks > 0:
            unprompted = self.decoder(torch.cat([features, torch.zeros_like(image), torch.zeros_like(image)], dim=1))
        return SegmentOutput(logits, ich_logit, features, unprompted)

    @staticmethod
    def _click(target: torch.Tensor, previous: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        click = torch.zeros_like(target)
        for b in range(len(target)):
            error = (target[b, 0] > 0.5) ^ (previous[b, 0] > 0.5)
            voxels = error.nonzero()
            if len(voxels):
                # drawn on the generator's device: the Trainer's click generator lives on settings.device
                device = generator.device if generator is not None else target.device
                i = int(torch.randint(len(voxels), (1,), generator=generator, device=device))
                x, y, z = voxels[i].tolist()
                click[b, 0, x, y, z] = 1.0 if target[b, 0, x, y, z] > 0.5 else -1.0
        return click


def make_cases(n: int, *, seed: int = 0, size: int = SIZE) -> list[dict[str, Any]]:
    """n cases alternating positive (a bright cube with its mask) and negative (empty mask)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(n):
        image = torch.randn(1, size, size, size, generator=g)
        label = torch.zeros(1, size, size, size)
        if i % 2 == 0:
            x, y, z = torch.randint(2, size - 6, (3,), generator=g).tolist()
            label[:, x : x + 4, y : y + 4, z : z + 4] = 1.0
            image = image + 2.0 * label
        cases.append({"image": image, "label": label, "ich": torch.tensor(float(i % 2 == 0)), "case_id": f"c{i}"})
    return cases


def loaders(
    n_train: int = 8, n_val: int = 4, *, batch_size: int = 2, shuffle: bool = True
) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(make_cases(n_train, seed=1), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator())
    val = DataLoader(make_cases(n_val, seed=2), batch_size=2)
    return train, val


def settings(**overrides: Any) -> TrainSettings:
    base = TrainSettings(
        epochs=2,
        seed=0,
        train_clicks=2,
        val_clicks=(1, 2),
        ich_loss_weight=0.1,
        patience=50,
        progress=False,
        log_freq=1000,  # curves only at the end: drawing takes most of a tiny run's time
    )
    return replace(base, **overrides)


def make_trainer(
    run_dir: Path,
    *,
    train_settings: TrainSettings | None = None,
    batch_size: int = 2,
    n_train: int = 8,
    optimizer: str = "sgd",
    scheduler: str = "step",
    scheduler_kwargs: dict[str, Any] | None = None,
    model: nn.Module | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """A Trainer on the stand-in model; the model weights depend only on the seed 0."""
    train_settings = train_settings or settings()
    torch.manual_seed(0)
    model = model or TinySegmenter()
    train, val = loaders(n_train, batch_size=batch_size)
    if optimizer == "sgd":  # SGD: an update proportional to the gradient, so scaling errors show
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = -(-len(train) // train_settings.grad_accum_steps)
    kwargs = {"step_size": 100, **(scheduler_kwargs or {})}
    schedule: Schedule = build_scheduler(scheduler, opt, epochs=train_settings.epochs, steps_per_epoch=steps, **kwargs)
    return Trainer(
        model=model,
        optimizer=opt,
        schedule=schedule,
        train_loader=train,
        val_loader=val,
        settings=train_settings,
        run_dir=run_dir,
        resolved_config={"seed": 0, "optim": {"lr": 0.1}},
        **trainer_kwargs,
    )


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
