"""Prediction onto the scan's own grid, sliding-window coverage, the encoder export and BLIP-2 consumption."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.patience import patience

from samft import postprocess
from samft.engine.checkpoint import FORMAT, save_checkpoint
from samft.export import load_encoder, save_encoder
from samft.inference import Predictor
from samft.model import SegmentOutput, build_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = {"name": "sam_med3d_tiny", "visual_tokens": 32}
DATA = {"spacing": [1.5, 1.5, 1.5], "roi_size": 128, "intensity": "window", "window_center": 40.0,
        "window_width": 80.0}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A samft checkpoint of a randomly initialised tiny model, as a run would write it."""
    torch.manual_seed(0)
    model = build_model(**TINY)
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint({"format": FORMAT, "model": model.state_dict(),
                     "config": {"model": TINY, "data": DATA}}, folder / "best_model.pth")
    return folder / "best_model.pth", model.eval()


def write_scan(path: Path, shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.normal(35, 10, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), path)
    return hu


def test_export_rebuilds_tokens_of_the_trained_model(tmp_path: Path, tiny_checkpoint) -> None:
    _, model = tiny_checkpoint
    save_encoder(model, tmp_path / "sam_encoder.pth", model_name=TINY["name"], visual_tokens=TINY["visual_tokens"])
    payload = torch.load(tmp_path / "sam_encoder.pth", weights_only=True)
    assert set(payload) == {"format_version", "architecture", "image_encoder_state_dict",
                            "representation_head_state_dict"}
    encoder = load_encoder(tmp_path / "sam_encoder.pth")
    image = torch.randn(2, 1, 128, 128, 128)
    with torch.no_grad():
        expected = model.visual_tokens(model.encode(image))
        tokens = encoder(image)
    assert tokens.shape == (2, 8 * 8 * 8, TINY["visual_tokens"])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_tokens_feed_a_blip2_qformer_and_gradients_reach_the_encoder(tmp_path: Path, tiny_checkpoint) -> None:
    import transformers

    _, model = tiny_checkpoint
    save_encoder(model, tmp_path / "sam_encoder.pth", model_name=TINY["name"], visual_tokens=TINY["visual_tokens"])
    encoder = load_encoder(tmp_path / "sam_encoder.pth").train()
    config = transformers.Blip2QFormerConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        encoder_hidden_size=TINY["visual_tokens"], cross_attention_frequency=1,
    )
    qformer = transformers.Blip2QFormerModel(config)
    queries = torch.nn.Parameter(torch.randn(1, 8, config.hidden_size))
    tokens = encoder(torch.randn(1, 1, 128, 128, 128))
    out = qformer(query_embeds=queries, encoder_hidden_states=tokens,
                  encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long))
    assert out.last_hidden_state.shape == (1, 8, config.hidden_size)
    out.last_hidden_state.pow(2).mean().backward()
    patch_grad = encoder.image_encoder.patch_embed.proj.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0
    assert encoder.representation_head.proj[0].weight.grad.abs().sum() > 0


def test_sliding_window_covers_large_volumes_without_seams(tmp_path: Path, tiny_checkpoint, monkeypatch) -> None:
    """With a voxel-wise predictor every voxel must get exactly its own value back: a seam or an uncovered
    border between tiles would show as a difference."""
    ckpt, _ = tiny_checkpoint
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    write_scan(tmp_path / "big.nii.gz", (200, 150, 140), affine)
    predictor = Predictor(ckpt, device=torch.device("cpu"), overlap=0.25)
    monkeypatch.setattr(predictor.model, "segment",
                        lambda window, **_: SegmentOutput([(window - 0.5) * 4.0], None, window))
    prediction = predictor.predict(tmp_path / "big.nii.gz")
    preprocessed = predictor.transforms({"image": str(tmp_path / "big.nii.gz")})["image"][0].numpy()
    expected = 1.0 / (1.0 + np.exp(-(preprocessed - 0.5) * 4.0))
    assert prediction.probabilities.shape == (200, 150, 140)
    np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-4)


def test_sliding_window_equals_single_pass_where_both_fit(tmp_path: Path, tiny_checkpoint) -> None:
    ckpt, model = tiny_checkpoint
    write_scan(tmp_path / "fit.nii.gz", (128, 128, 128), np.diag([1.5, 1.5, 1.5, 1.0]))
    predictor = Predictor(ckpt, device=torch.device("cpu"))
    prediction = predictor.predict(tmp_path / "fit.nii.gz")
    image = predictor.transforms({"image": str(tmp_path / "fit.nii.gz")})["image"].unsqueeze(0)
    with torch.no_grad():
        single = torch.sigmoid(model.segment(image.as_tensor(), num_clicks=0).logits[-1])[0, 0].numpy()
    np.testing.assert_allclose(prediction.probabilities, single, atol=1e-5)


def test_click_prompts_map_from_scan_voxels(tmp_path: Path, tiny_checkpoint, monkeypatch) -> None:
    """A click given in the scan's voxel indices lands on the same physical point in the model's window."""
    ckpt, _ = tiny_checkpoint
    affine = np.array([[0.9, 0, 0, -90], [0, 0.9, 0, -90], [0, 0, 3.0, -40], [0, 0, 0, 1.0]])
    hu = write_scan(tmp_path / "scan.nii.gz", (160, 160, 40), affine)
    hu[100:104, 60:64, 20:22] = 1000
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "scan.nii.gz")
    predictor = Predictor(ckpt, device=torch.device("cpu"))
    seen = {}

    def spy(features, *, points=None, mask_prompt=None):
        seen["points"] = points
        return torch.zeros(1, 1, 32, 32, 32)

    monkeypatch.setattr(predictor.model, "decode", spy)
    monkeypatch.setattr(predictor.model, "encode", lambda window: seen.setdefault("window", window))
    predictor.predict(tmp_path / "scan.nii.gz", points=[[101.5, 61.5, 20.5, 1]])
    coords = seen["points"][0][0, 0].round().long().tolist()
    assert seen["window"][0, 0, coords[0], coords[1], coords[2]] == 1.0  # the bright block, windowed to 1


def test_a_click_leaves_the_windows_without_it_to_a_model_trained_both_ways(tmp_path: Path, tiny_checkpoint) -> None:
    """model.prompt_mode=both: the clicked scan is segmented whole, prompt-free in the windows the click is not in."""
    ckpt, model = tiny_checkpoint
    both = tmp_path / "run" / "best_model.pth"
    both.parent.mkdir()
    save_checkpoint({"format": FORMAT, "model": model.state_dict(),
                     "config": {"model": {**TINY, "prompt_mode": "both"}, "data": DATA}}, both)
    write_scan(tmp_path / "long.nii.gz", (176, 40, 24), np.diag([1.5, 1.5, 1.5, 1.0]))  # windows at x 0 and 48
    predictor = Predictor(both, device=torch.device("cpu"))
    clicked = predictor.predict(tmp_path / "long.nii.gz", points=[[20, 20, 12, 1]]).probabilities
    free = predictor.predict(tmp_path / "long.nii.gz").probabilities
    np.testing.assert_allclose(clicked[132:], free[132:], atol=1e-6)  # only the window at 48 sees these
    assert np.abs(clicked[:40] - free[:40]).max() > 1e-3  # only the clicked window sees these


def test_post_processing_keeps_the_clicked_component(tmp_path: Path, tiny_checkpoint, monkeypatch) -> None:
    """The run's small-component rule drops specks, but never the component a positive click points at."""
    ckpt, _ = tiny_checkpoint
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.name).write_bytes(ckpt.read_bytes())
    postprocess.save(run, {"min_component_ml": 0.1})
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    hu = write_scan(tmp_path / "scan.nii.gz", (40, 40, 40), affine)
    hu[5:8, 5:8, 5:8] = 1000  # two bright specks of 27 voxels, 0.09 ml each
    hu[30:33, 30:33, 30:33] = 1000
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "scan.nii.gz")
    predictor = Predictor(run / ckpt.name, device=torch.device("cpu"))
    # the model marks the bright voxels (1 after the 0-80 HU window), whatever the prompt
    monkeypatch.setattr("samft.inference.scan_logits", lambda model, image, **_: (image - 0.99).sign() * 10)
    assert predictor.predict(tmp_path / "scan.nii.gz").mask().sum() == 0
    clicked = predictor.predict(tmp_path / "scan.nii.gz", points=[[31.0, 31.0, 31.0, 1], [6.0, 6.0, 6.0, 0]])
    assert clicked.clicked == ((31, 31, 31),)
    mask = clicked.mask()
    assert mask[30:33, 30:33, 30:33].all() and mask.sum() == 27


@pytest.mark.skipif(not (SHARED / "head_ct.nii.gz").exists(), reason="../shared/data is absent")
def test_predict_cli_on_the_real_head_ct_keeps_shape_and_affine(tmp_path: Path, tiny_checkpoint) -> None:
    ckpt, _ = tiny_checkpoint
    proc = subprocess.run(
        [sys.executable, "-m", "samft.predict", f"ckpt={ckpt}", f"input={SHARED / 'head_ct.nii.gz'}",
         f"output={tmp_path / 'out'}", "probabilities=true"],
        capture_output=True, text=True, timeout=patience(300), env={**_env(), "SAMFT_LOG_DIR": str(tmp_path / "logs")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    scan = nib.load(SHARED / "head_ct.nii.gz")
    mask = nib.load(tmp_path / "out" / "head_ct_mask.nii.gz")
    prob = nib.load(tmp_path / "out" / "head_ct_prob.nii.gz")
    assert mask.shape == scan.shape == prob.shape
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-6)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (prob.get_fdata() > 0.5).astype(np.uint8))


def test_predict_cli_reports_bad_inputs_per_file(tmp_path: Path, tiny_checkpoint) -> None:
    ckpt, _ = tiny_checkpoint
    folder = tmp_path / "scans"
    folder.mkdir()
    write_scan(folder / "good.nii.gz", (130, 130, 20), np.diag([1.0, 1.0, 5.0, 1.0]))
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    proc = subprocess.run(
        [sys.executable, "-m", "samft.predict", f"ckpt={ckpt}", f"input={folder}", f"output={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=patience(300), env={**_env(), "SAMFT_LOG_DIR": str(tmp_path / "logs")},
    )
    assert proc.returncode == 2
    assert "broken.nii.gz" in proc.stderr.strip().splitlines()[-1]
    assert (tmp_path / "out" / "good_mask.nii.gz").exists()
    assert not (tmp_path / "out" / "broken_mask.nii.gz").exists()


def _env() -> dict[str, str]:
    return dict(os.environ)



def test_readme_blip2_snippet_runs(tmp_path: Path, tiny_checkpoint) -> None:
    _, model = tiny_checkpoint
    export = tmp_path / "sam_encoder.pth"
    save_encoder(model, export, model_name=TINY["name"], visual_tokens=TINY["visual_tokens"])
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The encoder export and BLIP-2", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    assert "outputs/train/<run>/sam_encoder.pth" in snippet
    namespace: dict = {}
    exec(compile(snippet.replace("outputs/train/<run>/sam_encoder.pth", str(export)), "README", "exec"), namespace)
    assert namespace["tokens"].shape == (1, 512, TINY["visual_tokens"])
    assert namespace["out"].last_hidden_state.shape == (1, 32, 768)
