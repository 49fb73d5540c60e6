"""State-dict layout of the released model, checkpoint loading, freezing and parameter groups."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import huggingface_hub.errors
import pytest
import torch

import samft.model.build as build
from samft.errors import UserError
from samft.model import RELEASED_CHECKPOINT_URL, build_model, param_groups

KEYS_JSON = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "sam_med3d_turbo_keys.json"
SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@pytest.fixture(scope="module")
def released_keys() -> list:
    if not KEYS_JSON.is_file():
        pytest.skip(f"{KEYS_JSON} not present")
    return json.loads(KEYS_JSON.read_text())["keys"]


@pytest.fixture(scope="module")
def full_model():
    return build_model(name="sam_med3d")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_model(name="sam_med3d_tiny", visual_tokens=16)


def sam_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(SAM_PARTS)}


def test_full_size_state_dict_equals_released_layout(full_model, released_keys):
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in full_model.state_dict().items() if k.startswith(SAM_PARTS)]
    assert ours == released_keys
    assert len(ours) == 324
    assert sum(p.numel() for n, p in full_model.named_parameters() if n.startswith(SAM_PARTS)) == 100_509_232
    assert full_model.img_size == 128
    heads = {k.split(".")[0] for k in full_model.state_dict() if not k.startswith(SAM_PARTS)}
    assert heads == {"representation_head", "ich_head"}
    assert full_model.representation_head.proj[0].in_features == 384


def test_released_checkpoint_loads_strictly_and_heads_stay(full_model, released_keys, tmp_path):
    # A file with exactly the released keys and shapes; stride-0 tensors keep it a few kilobytes on disk.
    weights = {k: torch.full((1,), float(i)).expand(shape) for i, (k, shape, _) in enumerate(released_keys)}
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": weights, "epoch": 3}, path)
    heads_before = {k: v.clone() for k, v in full_model.state_dict().items() if not k.startswith(SAM_PARTS)}

    build.load_weights(full_model, path, model_name="sam_med3d")

    state = full_model.state_dict()
    for i, (key, _, _) in enumerate(released_keys):
        assert torch.all(state[key] == i), key
    for key, value in heads_before.items():
        assert torch.equal(state[key], value), key


def test_prefixed_and_own_checkpoints_load(tiny, tmp_path):
    source = build_model(name="sam_med3d_tiny", visual_tokens=16)
    # DDP + torch.compile prefixes on a released-style file: SAM parts only, heads stay.
    prefixed = {f"module._orig_mod.{k}": v for k, v in sam_state(source).items()}
    torch.save({"model_state_dict": prefixed}, tmp_path / "ddp.pth")
    head_before = tiny.ich_head.fc.weight.clone()
    build.load_weights(tiny, tmp_path / "ddp.pth", model_name="sam_med3d_tiny")
    assert torch.equal(tiny.image_encoder.pos_embed, source.image_encoder.pos_embed)
    assert torch.equal(tiny.ich_head.fc.weight, head_before)

    # Our own checkpoint (key "model", heads included) and a bare state dict load everything.
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}}, "epoch": 1}, tmp_path / "own.pth")
    loaded = build_model(name="sam_med3d_tiny", visual_tokens=16, checkpoint=tmp_path / "own.pth")
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    bare = build_model(name="sam_med3d_tiny", visual_tokens=16, checkpoint=str(tmp_path / "bare.pth"))
    for model in (loaded, bare):
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("change, words", [
    ("drop", ["1 missing", "mask_decoder.iou_token.weight", "0 unexpected"]),
    ("extra", ["1 unexpected", "image_encoder.extra", "0 missing"]),
    ("shape", ["1 wrong shape", "image_encoder.pos_embed [1, 8, 8, 8, 95] vs [1, 8, 8, 8, 96]"]),
    ("head_shape", ["1 wrong shape", "ich_head.fc.weight [1, 15] vs [1, 16]"]),
])
def test_mismatched_checkpoint_names_the_keys(tiny, tmp_path, change, words):
    state = dict(tiny.state_dict()) if change == "head_shape" else sam_state(tiny)
    if change == "drop":
        del state["mask_decoder.iou_token.weight"]
    elif change == "extra":
        state["image_encoder.extra"] = torch.zeros(2)
    elif change == "shape":
        state["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 8, 95)
    else:
        state["ich_head.fc.weight"] = torch.zeros(1, 15)
    torch.save({"model_state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(UserError) as info:
        build.load_weights(tiny, tmp_path / "bad.pth", model_name="sam_med3d_tiny")
    message = str(info.value)
    assert "\n" not in message and "bad.pth" in message and "model.name=sam_med3d_tiny" in message
    for word in words:
        assert word in message


def test_full_checkpoint_into_tiny_model_is_refused(tiny, full_model, tmp_path):
    torch.save({"model_state_dict": {k: v for k, v in full_model.state_dict().items()
                                     if k.startswith("image_encoder.pos")}}, tmp_path / "full.pth")
    with pytest.raises(UserError, match=r"wrong shape.*image_encoder.pos_embed \[1, 8, 8, 8, 768\]"):
        build.load_weights(tiny, tmp_path / "full.pth", model_name="sam_med3d_tiny")


def test_unreadable_checkpoints_are_user_errors(tmp_path):
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pth")
    cases = [("pickled.pth", "weights-only"), ("garbage.pth", "weights-only"), ("no_weights.pth", "no state dict"),
             ("missing.pth", "not found")]
    for name, words in cases:
        with pytest.raises(UserError, match=words) as info:
            build_model(name="sam_med3d_tiny", checkpoint=tmp_path / name)
        assert "\n" not in str(info.value)


def test_hugging_face_url_downloads_through_the_hub_cache(tiny, tmp_path, monkeypatch):
    torch.save({"model_state_dict": sam_state(tiny)}, tmp_path / "cached.pth")
    calls = []

    def fake_download(repo_id, filename, *, revision):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / "cached.pth")

    monkeypatch.setattr(build.huggingface_hub, "hf_hub_download", fake_download)
    assert build.resolve_checkpoint(RELEASED_CHECKPOINT_URL) == tmp_path / "cached.pth"
    assert calls == [("blueyo0/SAM-Med3D", "sam_med3d_turbo.pth", "main")]


def test_offline_download_says_how_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(build.huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError) as info:
        build_model(name="sam_med3d_tiny", checkpoint=RELEASED_CHECKPOINT_URL)
    message = str(info.value)
    assert "\n" not in message
    assert "model.checkpoint=/path/to/sam_med3d_turbo.pth" in message and "OfflineModeIsEnabled" in message
    with pytest.raises(UserError, match="not a Hugging Face file URL"):
        build_model(name="sam_med3d_tiny", checkpoint="https://example.org/weights.pth")


def test_unknown_model_name():
    with pytest.raises(UserError, match=r"model.name='vit_h' is not one of \['sam_med3d', 'sam_med3d_tiny', 'unet'\]"):
        build_model(name="vit_h")


def test_param_groups_frozen_encoder_and_lr_multiplier():
    model = build_model(name="sam_med3d_tiny", visual_tokens=16)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, encoder_lr_mult=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder", "encoder_no_decay", "rest", "rest_no_decay"}
    assert by_name["encoder"]["lr"] == pytest.approx(1e-4) and by_name["rest"]["lr"] == 1e-3
    assert by_name["encoder_no_decay"]["weight_decay"] == 0.0 and by_name["rest"]["weight_decay"] == 0.05
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay = {id(p) for p in by_name["encoder_no_decay"]["params"]}
    assert id(model.image_encoder.pos_embed) in no_decay
    assert id(model.image_encoder.blocks[0].attn.rel_pos_d) in no_decay
    assert id(model.image_encoder.blocks[0].attn.qkv.bias) in no_decay
    torch.optim.AdamW(groups)  # the groups are valid optimiser input

    frozen = build_model(name="sam_med3d_tiny", visual_tokens=16, freeze_encoder=True)
    groups = param_groups(frozen, lr=1e-3, weight_decay=0.05, encoder_lr_mult=0.1)
    assert {g["name"] for g in groups} == {"rest", "rest_no_decay"}
    frozen_ids = {id(p) for p in frozen.image_encoder.parameters()}
    assert not frozen_ids & {id(p) for g in groups for p in g["params"]}
    assert not any(p.requires_grad for p in frozen.image_encoder.parameters())
