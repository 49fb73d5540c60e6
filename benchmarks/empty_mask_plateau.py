"""How many updates a randomly initialised tiny SAM-Med3D needs before its masks appear, per lesion BCE weight.

An over-fitting check, not a speed benchmark: two positive demo volumes (128^3, lesions of 195 and 3920 voxels),
AdamW at lr 1e-3, one click, the training loss of `samft.engine.losses` with `lesion_pos_weight` = 1 (plain
BCE, the baseline) and the other weights asked for. Prints the training-batch Dice every `--every` updates and,
per weight, the first update whose Dice reaches 0.5, as a ratio against the baseline's.

    python benchmarks/empty_mask_plateau.py --steps 150 --weights 10 50 200
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import header

from samft.data.demo import ensure_demo_dataset
from samft.data.sources import csv_records
from samft.data.transforms import Preprocessing, crop_around_label
from samft.engine.losses import SegmentationLoss
from samft.model import build_model


def demo_batch(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """image, label: 2 x 1 x 128 x 128 x 128, the first two positive training volumes of a 4-patient demo."""
    train_csv, val_csv, mask_dir = ensure_demo_dataset(root=root, n_patients=4, seed=0)
    train, _ = csv_records(train_csv, val_csv, mask_dir)
    settings = Preprocessing()
    pipeline = settings.transforms("val")
    samples = [pipeline(record) for record in train if record["ich"] == 1][:2]
    crops = [crop_around_label(s["image"].as_tensor(), s["label"].as_tensor(), settings.roi, air=settings.air)
             for s in samples]
    return torch.stack([image for image, _ in crops]), torch.stack([label for _, label in crops])


def dice_curve(image: torch.Tensor, label: torch.Tensor, *, weight: float, steps: int, every: int) -> list[float]:
    """Training-batch Dice (threshold 0.5) at updates 0, every, 2 * every, ... for one lesion weight."""
    torch.manual_seed(0)
    model = build_model(name="sam_med3d_tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SegmentationLoss(ich_weight=0.0, lesion_pos_weight=weight)
    clicks = torch.Generator().manual_seed(0)
    curve = []
    for step in range(steps + 1):
        output = model.segment(image, target=label, num_clicks=1, generator=clicks)
        if step % every == 0:
            pred = (torch.sigmoid(output.logits[-1].detach()) > 0.5).float()
            curve.append(float(2 * (pred * label).sum() / (pred.sum() + label.sum())))
        if step < steps:
            loss = loss_fn(output, label, torch.ones(len(label)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return curve


def first_reaching(curve: list[float], every: int, level: float = 0.5) -> int | None:
    return next((i * every for i, dice in enumerate(curve) if dice >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--weights", type=float, nargs="+", default=[10.0, 50.0, 200.0])
    args = parser.parse_args()
    print(header(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        image, label = demo_batch(Path(tmp))
    reached = {}
    for weight in [1.0, *args.weights]:
        curve = dice_curve(image, label, weight=weight, steps=args.steps, every=args.every)
        reached[weight] = first_reaching(curve, args.every)
        print(f"lesion_pos_weight {weight:g}: Dice every {args.every} updates " + " ".join(f"{d:.2f}" for d in curve))
    base = reached[1.0]
    for weight in args.weights:
        mine = reached[weight]
        if base is None or mine is None:
            print(f"ratio weight {weight:g} / weight 1, updates to Dice 0.5: {mine} / {base} (not both reached)")
        else:
            print(f"ratio weight {weight:g} / weight 1, updates to Dice 0.5: {mine} / {base} = {mine / base:.3f}x")


if __name__ == "__main__":
    main()
