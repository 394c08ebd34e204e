"""synthetic_em_volume and the `seqvision synth-em` command."""

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from seqvision.cli import main
from seqvision.data import EMCropDataset, read_labels, read_volume, synthetic_em_volume

SHAPE = (12, 96, 96)


@pytest.fixture(scope="module")
def volume():
    return synthetic_em_volume(SHAPE, seed=0, missing_sections=0)


def blank_sections(raw):
    return [z for z in range(raw.shape[0]) if raw[z].min() == raw[z].max()]


def test_same_seed_same_volume_other_seed_other_volume(volume):
    raw, labels = volume
    again_raw, again_labels = synthetic_em_volume(SHAPE, seed=0, missing_sections=0)
    assert np.array_equal(raw, again_raw) and np.array_equal(labels, again_labels)
    other_raw, other_labels = synthetic_em_volume(SHAPE, seed=1, missing_sections=0)
    assert not np.array_equal(raw, other_raw) and not np.array_equal(labels, other_labels)


def test_dtypes_shapes_and_ids(volume):
    raw, labels = volume
    assert raw.shape == labels.shape == SHAPE
    assert raw.dtype == np.uint8 and labels.dtype == np.uint64
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # every voxel is in a cell, no gaps
    # 0.48 x 0.38 x 0.38 um of neurites about 300 nm wide: tens of cells, not one and not thousands.
    assert 5 <= len(ids) <= 200
    assert raw.std() > 10  # not a flat image


def test_membranes_are_darker_than_cell_interiors(volume):
    raw, labels = volume
    boundary = np.zeros(labels.shape, bool)
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    boundary[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    # Interior: more than 5 pixels (20 nm) from a boundary within the section.
    interior = ~binary_dilation(boundary, structure=np.ones((1, 11, 11), bool))
    assert raw[boundary].mean() < raw[interior].mean() - 30


def test_cells_run_along_z(volume):
    """Neurites are elongated along z: a label continues to the next section (40 nm away) more often
    than to the pixel 40 nm away in the same section."""
    _, labels = volume
    same_along_z = np.mean(labels[1:] == labels[:-1])
    same_along_y = np.mean(labels[:, 10:] == labels[:, :-10])
    assert same_along_z > same_along_y


def test_missing_sections_when_asked(volume):
    assert blank_sections(volume[0]) == []
    raw, labels = synthetic_em_volume(SHAPE, seed=0, missing_sections=3)
    blank = blank_sections(raw)
    assert len(blank) == 3 and 0 not in blank and SHAPE[0] - 1 not in blank
    np.testing.assert_array_equal(labels, volume[1])  # labels are kept under missing sections
    default = synthetic_em_volume((4, 32, 32), seed=2)[0]
    assert len(blank_sections(default)) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape must be three positive ints"):
        synthetic_em_volume((8, 64))
    with pytest.raises(ValueError, match=r"missing_sections must be in \[0, Z - 2\] = \[0, 2\]"):
        synthetic_em_volume((4, 16, 16), missing_sections=3)
    with pytest.raises(ValueError, match="voxel_size"):
        synthetic_em_volume((4, 16, 16), voxel_size=(40, 4))
    with pytest.raises(ValueError, match="cell_size_nm must be > 0"):
        synthetic_em_volume((4, 16, 16), cell_size_nm=0)


def test_synth_em_command_writes_a_readable_cremi_file(tmp_path, capsys):
    path = tmp_path / "synthetic.h5"
    assert main(["synth-em", str(path), "--shape", "8", "64", "64", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "raw 8x64x64 uint8 at 40x4x4 nm" in out and "missing sections: 1" in out
    raw, labels = synthetic_em_volume((8, 64, 64), seed=4)
    np.testing.assert_array_equal(read_volume(path), raw)
    np.testing.assert_array_equal(read_labels(path), labels)
    item = EMCropDataset(path, path, crop_size=(4, 32, 32))[0]  # the file feeds the dataset as it is
    assert item["raw"].shape == (1, 4, 32, 32) and item["labels"].min() >= 1
    assert main(["synth-em", str(tmp_path / "absent" / "x.h5")]) == 2
    assert "no such folder" in capsys.readouterr().err
