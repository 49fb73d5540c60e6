"""A scan read by prediction carries exactly the meta the training pipeline's reader (`LoadCased`) gives it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from samft.data.readers import read_volume, volume_meta
from samft.data.transforms import LoadCased, cased


def test_an_already_read_volume_is_handed_on_as_load_cased_hands_on_the_file(tmp_path: Path) -> None:
    affine = np.array([[0.0, -0.9, 0.0, 12.0], [0.0, 0.0, 5.0, -3.0], [1.1, 0.0, 0.0, 7.5], [0.0, 0.0, 0.0, 1.0]])
    voxels = np.random.default_rng(0).normal(40, 20, size=(6, 5, 4)).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(voxels, affine), path)

    from_file = LoadCased()({"image": str(path)})["image"]
    volume = read_volume(path)
    from_volume = cased(torch.from_numpy(volume.array.astype(np.float32))[None], volume_meta(volume), str(path))

    assert from_volume.shape == from_file.shape == (1, 6, 5, 4)
    torch.testing.assert_close(from_volume.as_tensor(), from_file.as_tensor())
    assert from_volume.meta.keys() == from_file.meta.keys()
    for key, value in from_file.meta.items():
        if isinstance(value, str):  # the space (RAS) and the file name
            assert from_volume.meta[key] == value, key
        else:  # affines and the shape, as a tensor or an array
            np.testing.assert_allclose(np.asarray(from_volume.meta[key]), np.asarray(value), err_msg=key)
