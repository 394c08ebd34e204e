"""EM volume readers, the CREMI writer, EMAugment and EMCropDataset."""

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch.utils.data import DataLoader

from seqvision.data import (
    LABELS_KEY,
    RAW_KEY,
    EMAugment,
    EMCropDataset,
    LazyVolume,
    open_volume,
    read_labels,
    read_volume,
    split_volume_spec,
    write_cremi,
)

NO_AUGMENT = dict(
    flip_z_p=0.0,
    flip_y_p=0.0,
    flip_x_p=0.0,
    transpose_p=0.0,
    intensity_p=0.0,
    blurred_section_p=0.0,
    noise_p=0.0,
    missing_section_p=0.0,
)


def only(**settings):
    """An EMAugment with every augmentation off except ``settings``."""
    return EMAugment(**{**NO_AUGMENT, **settings})


def random_volume(shape=(6, 20, 24), dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, 200, size=shape).astype(dtype)


def write_h5(path, datasets):
    with h5py.File(path, "w") as file:
        for key, value in datasets.items():
            file[key] = value
    return path


def write_zarr_group(path, datasets):
    """A zarr group with nested arrays, through the zarr 3 API or the zarr 2 one."""
    root = zarr.open_group(str(path), mode="w")
    for key, value in datasets.items():
        if hasattr(root, "create_array"):
            root.create_array(key, shape=value.shape, dtype=value.dtype)[...] = value
        else:
            root.create_dataset(key, data=value)
    return path


def position_volume(shape):
    """Labels that encode each voxel's position (1 + raster index) and raw = a known function of them."""
    labels = np.arange(1, np.prod(shape) + 1, dtype=np.int64).reshape(shape)
    return raw_of(labels), labels


def raw_of(labels):
    return ((labels * 7919) % 256).astype(np.uint8)


def decode(labels, shape):
    """(z, y, x) source coordinates of every voxel of a label crop of ``position_volume(shape)``."""
    return np.unravel_index(labels - 1, shape)


def assert_box(coords, axis):
    """coords varies along ``axis`` only, by consecutive steps of +1 or -1; returns the step."""
    moved = np.diff(coords, axis=axis)
    step = moved.flat[0]
    assert step in (1, -1) and (moved == step).all()
    for other in {0, 1, 2} - {axis}:
        assert (np.diff(coords, axis=other) == 0).all()
    return step


# ----------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a/b.h5:volumes/raw", (Path("a/b.h5"), "volumes/raw")),
        ("C:/data/b.hdf5:raw", (Path("C:/data/b.hdf5"), "raw")),
        ("C:/data/b.hdf5", (Path("C:/data/b.hdf5"), None)),
        ("stack.tif", (Path("stack.tif"), None)),
        ("store.zarr/:volumes/raw", (Path("store.zarr/"), "volumes/raw")),
        ("b.H5:", (Path("b.H5"), None)),
        (Path("odd:name.h5"), (Path("odd:name.h5"), None)),
    ],
)
def test_split_volume_spec(spec, expected):
    assert split_volume_spec(spec) == expected


def test_hdf5_cremi_keys_custom_keys_and_spec_strings(tmp_path):
    raw, labels, other = random_volume(), random_volume(dtype=np.uint64, seed=1), random_volume(seed=2)
    path = write_h5(tmp_path / "sample.h5", {RAW_KEY: raw, LABELS_KEY: labels, "custom/deep/data": other})
    np.testing.assert_array_equal(read_volume(path), raw)
    np.testing.assert_array_equal(read_labels(path), labels)
    np.testing.assert_array_equal(read_volume(path, "custom/deep/data"), other)
    np.testing.assert_array_equal(read_volume(f"{path}:custom/deep/data"), other)
    np.testing.assert_array_equal(read_labels(f"{path}:{LABELS_KEY}"), labels)
    assert read_volume(path).dtype == np.uint8 and read_labels(path).dtype == np.uint64


def test_tiff_stack_is_z_y_x(tmp_path):
    raw = random_volume((5, 16, 12), np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", raw)
    volume = read_volume(tmp_path / "stack.tif")
    assert volume.shape == (5, 16, 12)
    np.testing.assert_array_equal(volume, raw)


def test_zarr_array_and_group(tmp_path):
    raw = random_volume(dtype=np.float32)
    array = zarr.open_array(str(tmp_path / "array.zarr"), mode="w", shape=raw.shape, dtype=raw.dtype)
    array[...] = raw
    np.testing.assert_array_equal(read_volume(tmp_path / "array.zarr"), raw)
    group = write_zarr_group(tmp_path / "group.zarr", {RAW_KEY: raw, "other/raw2": raw + 1})
    np.testing.assert_array_equal(read_volume(group), raw)
    np.testing.assert_array_equal(read_volume(f"{group}:other/raw2"), raw + 1)
    with pytest.raises(ValueError, match=r"no dataset 'missing'.*'other/raw2', 'volumes/raw'"):
        read_volume(group, "missing")
    with pytest.raises(ValueError, match="is a zarr array, not a group"):
        read_volume(tmp_path / "array.zarr", "volumes/raw")


def test_npy_and_arrays_in_memory(tmp_path):
    raw = random_volume(dtype=np.int16)
    np.save(tmp_path / "raw.npy", raw)
    volume = read_volume(tmp_path / "raw.npy")
    assert type(volume) is np.ndarray  # in memory, not a map of the file
    np.testing.assert_array_equal(volume, raw)
    np.testing.assert_array_equal(read_volume(raw), raw)


def test_open_volume_reads_lazily_and_pickles(tmp_path):
    raw = random_volume((8, 30, 30))
    path = write_h5(tmp_path / "lazy.h5", {RAW_KEY: raw})
    volume = open_volume(path)
    assert isinstance(volume, LazyVolume) and volume.shape == raw.shape and volume.dtype == np.uint8
    np.testing.assert_array_equal(volume[2:5, 3:9, :4], raw[2:5, 3:9, :4])
    restored = pickle.loads(pickle.dumps(volume))  # the open h5py handle is not pickled
    np.testing.assert_array_equal(restored[1:2, :, 7], raw[1:2, :, 7])
    volume.close()
    np.testing.assert_array_equal(volume[0], raw[0])  # reopens
    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(read_volume(file[RAW_KEY]), raw)
    np.save(tmp_path / "mapped.npy", raw)
    assert isinstance(open_volume(tmp_path / "mapped.npy"), np.memmap)


def write_bad(tmp_path, kind):
    if kind == "missing file":
        return tmp_path / "absent.h5"
    if kind == "missing key":
        return write_h5(tmp_path / "bad.h5", {"other/data": random_volume(), "more": random_volume()})
    if kind == "2-D":
        return write_h5(tmp_path / "bad.h5", {RAW_KEY: np.zeros((16, 16), np.uint8)})
    if kind == "4-D tiff":
        tifffile.imwrite(tmp_path / "bad.tif", np.zeros((3, 8, 8, 3), np.uint8), photometric="rgb")
        return tmp_path / "bad.tif"
    if kind == "empty":
        return write_h5(tmp_path / "bad.h5", {RAW_KEY: np.zeros((0, 16, 16), np.uint8)})
    if kind == "strings":
        np.save(tmp_path / "bad.npy", np.full((2, 3, 4), "a"))
        return tmp_path / "bad.npy"
    if kind == "bool":
        np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), bool))
        return tmp_path / "bad.npy"
    if kind == "complex":
        return write_h5(tmp_path / "bad.h5", {RAW_KEY: np.zeros((2, 3, 4), np.complex64)})
    if kind == "objects":
        np.save(tmp_path / "bad.npy", np.empty((2, 3, 4), object), allow_pickle=True)
        return tmp_path / "bad.npy"
    if kind == "NaN":
        raw = np.zeros((2, 3, 4), np.float32)
        raw[1, 2, 3] = np.nan
        return write_h5(tmp_path / "bad.h5", {RAW_KEY: raw})
    if kind == "not HDF5":
        (tmp_path / "bad.h5").write_text("not an HDF5 file")
        return tmp_path / "bad.h5"
    if kind == "unknown suffix":
        (tmp_path / "bad.png").write_bytes(b"")
        return tmp_path / "bad.png"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("missing file", FileNotFoundError, "absent.h5: no such file"),
        ("missing key", ValueError, r"no dataset 'volumes/raw'.*found: 'more', 'other/data'"),
        ("2-D", ValueError, r"expected a 3-D \(Z, Y, X\) volume, got 2-D shape \(16, 16\)"),
        ("4-D tiff", ValueError, r"got 4-D shape \(3, 8, 8, 3\)"),
        ("empty", ValueError, r"empty \(shape \(0, 16, 16\)\)"),
        ("strings", TypeError, "must be integer or floating point numbers, got dtype <U1"),
        ("bool", TypeError, "got dtype bool"),
        ("complex", TypeError, "got dtype complex64"),
        ("objects", TypeError, "holds Python objects"),
        ("NaN", ValueError, "contain NaN"),
        ("not HDF5", ValueError, "cannot be read as HDF5"),
        ("unknown suffix", ValueError, "unknown volume format '.png'"),
    ],
)
def test_bad_files_are_named_errors(tmp_path, kind, error, message):
    path = write_bad(tmp_path, kind)
    with pytest.raises(error, match=message) as info:
        read_volume(path)
    assert path.name in str(info.value)


def test_label_and_key_errors(tmp_path):
    path = write_h5(tmp_path / "float_labels.h5", {LABELS_KEY: np.zeros((2, 3, 4), np.float32)})
    with pytest.raises(TypeError, match="labels must be integer neuron ids, got dtype float32"):
        read_labels(path)
    np.save(tmp_path / "raw.npy", random_volume())
    with pytest.raises(ValueError, match=r"a key .* applies only to HDF5 files and zarr groups"):
        read_volume(tmp_path / "raw.npy", key="volumes/raw")
    with pytest.raises(TypeError, match="source must be a path"):
        read_volume(42)


# ------------------------------------------------------------------------------------------ writer


def test_write_cremi_round_trip_and_atomicity(tmp_path):
    raw, labels = random_volume(), random_volume(dtype=np.uint32, seed=1)
    path = tmp_path / "out.h5"
    path.write_text("an older file, replaced")
    assert write_cremi(path, raw, labels, resolution=(30, 5, 5)) == path
    np.testing.assert_array_equal(read_volume(path), raw)
    np.testing.assert_array_equal(read_labels(path), labels)
    with h5py.File(path, "r") as file:
        assert file[LABELS_KEY].dtype == np.uint64
        np.testing.assert_array_equal(file[RAW_KEY].attrs["resolution"], [30, 5, 5])
        np.testing.assert_array_equal(file[LABELS_KEY].attrs["resolution"], [30, 5, 5])
    with pytest.raises(ValueError, match="labels shape"):
        write_cremi(tmp_path / "mismatch.h5", raw, labels[:, :5])
    with pytest.raises(ValueError, match="contain NaN"):
        write_cremi(tmp_path / "nan.h5", np.full((2, 2, 2), np.nan))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_cremi(tmp_path / "absent" / "x.h5", raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]  # no partial or temporary files


# ----------------------------------------------------------------------------------- augmentations


def test_em_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"flip_x_p must be a probability in \[0, 1\], got 1.5"):
        EMAugment(flip_x_p=1.5)
    with pytest.raises(ValueError, match="gamma must be"):
        EMAugment(gamma=(1.4, 0.7))
    with pytest.raises(ValueError, match="max_sections"):
        EMAugment(max_sections=0)


def test_blurred_sections_stay_in_their_plane_and_use_nm():
    """A point in every section; one section is blurred, in y/x only, by sigma_nm / voxel size per axis."""
    raw = np.zeros((6, 41, 41), np.float32)
    raw[:, 20, 20] = 1.0
    augment = only(blurred_section_p=1.0, blur_sigma_nm=(16.0, 16.0), max_sections=1)
    out = augment.intensity(raw, np.random.default_rng(0), voxel_size=(40.0, 4.0, 8.0))
    changed = [z for z in range(6) if not np.array_equal(out[z], raw[z])]
    assert len(changed) == 1
    section = out[changed[0]].astype(np.float64)
    section /= section.sum()
    offsets = np.arange(41) - 20
    var_y = (section.sum(1) * offsets**2).sum()
    var_x = (section.sum(0) * offsets**2).sum()
    # 16 nm is 4 pixels along y (4 nm) and 2 along x (8 nm); the point was clipped at 1, hence rtol.
    assert var_y == pytest.approx(16.0, rel=0.05) and var_x == pytest.approx(4.0, rel=0.05)


def test_noise_and_missing_sections_are_per_section():
    raw = np.tile(np.linspace(0.2, 0.8, 8, dtype=np.float32)[:, None, None], (1, 32, 32))
    noise = only(noise_p=1.0, noise_sigma=0.2)
    noisy = noise.intensity(raw, np.random.default_rng(1))
    spread = (noisy - raw).std(axis=(1, 2))
    assert spread.min() < 0.5 * spread.max()  # one noise level per section
    missing = only(missing_section_p=1.0, max_sections=3)
    out = missing.intensity(raw, np.random.default_rng(2))
    changed = [z for z in range(8) if not np.array_equal(out[z], raw[z])]
    assert 1 <= len(changed) <= 3
    assert all(out[z].min() == out[z].max() for z in changed)


# ----------------------------------------------------------------------------------------- dataset


@pytest.fixture
def volume():
    return random_volume((20, 170, 180), np.uint8, seed=3), random_volume((20, 170, 180), np.uint32, seed=4)


def test_items_have_the_documented_shapes_and_range(volume):
    raw, labels = volume
    dataset = EMCropDataset(raw, labels, samples_per_epoch=4)
    assert len(dataset) == 4
    for item in dataset:
        assert item["raw"].shape == (1, 16, 160, 160) and item["raw"].dtype == torch.float32
        assert item["raw"].min() >= 0 and item["raw"].max() <= 1
        assert item["labels"].shape == (16, 160, 160) and item["labels"].dtype == torch.int64
    assert set(EMCropDataset(raw, samples_per_epoch=1)[0]) == {"raw"}


def test_sample_depends_only_on_seed_epoch_and_index(volume):
    raw, _ = volume
    make = lambda seed=0: EMCropDataset(raw, crop_size=(4, 32, 32), samples_per_epoch=8, seed=seed)  # noqa: E731
    first, again = make(), make()
    assert torch.equal(first[3]["raw"], again[3]["raw"])
    assert torch.equal(first[-1]["raw"], first[7]["raw"])
    assert not torch.equal(first[3]["raw"], first[4]["raw"])
    assert not torch.equal(first[3]["raw"], make(seed=1)[3]["raw"])
    epoch0 = first[3]["raw"]
    first.set_epoch(1)
    assert not torch.equal(first[3]["raw"], epoch0)
    first.set_epoch(0)
    assert torch.equal(first[3]["raw"], epoch0)  # a resumed run reproduces its data
    with pytest.raises(IndexError):
        first[8]


def test_geometric_augmentations_move_raw_and_labels_together():
    shape = (12, 40, 40)
    raw, labels = position_volume(shape)
    augment = only(flip_z_p=0.5, flip_y_p=0.5, flip_x_p=0.5, transpose_p=0.5)
    dataset = EMCropDataset(raw, labels, crop_size=(5, 16, 16), samples_per_epoch=24, augment=augment)
    seen = set()
    for item in dataset:
        crop = item["labels"].numpy()
        # raw is still the same function of the labels at every voxel, so they moved together.
        np.testing.assert_array_equal(np.rint(item["raw"][0].numpy() * 255), raw_of(crop))
        z, y, x = decode(crop, shape)
        y_axis = 1 if np.diff(y, axis=1).any() else 2
        steps = (assert_box(z, 0), assert_box(y, y_axis), assert_box(x, 3 - y_axis))
        seen.add((*steps, y_axis))
    assert len(seen) >= 10  # most of the 16 flip/transpose combinations occurred


def test_all_geometric_augmentations_at_once():
    shape = (6, 16, 16)
    raw, labels = position_volume(shape)
    augment = only(flip_z_p=1.0, flip_y_p=1.0, flip_x_p=1.0, transpose_p=1.0)
    item = EMCropDataset(raw, labels, crop_size=shape, samples_per_epoch=1, augment=augment)[0]
    expected = np.flip(labels, (0, 1, 2)).swapaxes(1, 2)
    np.testing.assert_array_equal(item["labels"].numpy(), expected)
    np.testing.assert_array_equal(np.rint(item["raw"][0].numpy() * 255), raw_of(expected))


@pytest.mark.parametrize(
    ("crop", "voxel_size"), [((4, 8, 12), (40.0, 4.0, 4.0)), ((4, 12, 12), (40.0, 4.0, 6.0))]
)
def test_transpose_needs_a_square_isotropic_section(crop, voxel_size):
    shape = (6, 16, 16)
    raw, labels = position_volume(shape)
    augment = only(transpose_p=1.0)
    dataset = EMCropDataset(raw, labels, crop_size=crop, voxel_size=voxel_size, augment=augment)
    _, y, x = decode(dataset[0]["labels"].numpy(), shape)
    assert assert_box(y, 1) == 1 and assert_box(x, 2) == 1


def test_intensity_augmentations_never_touch_labels():
    shape = (8, 24, 24)
    raw, labels = position_volume(shape)
    augment = only(intensity_p=1.0, blurred_section_p=1.0, noise_p=1.0, missing_section_p=1.0)
    plain = EMCropDataset(raw, labels, crop_size=shape, augment=False)[0]
    for item in EMCropDataset(raw, labels, crop_size=shape, samples_per_epoch=4, augment=augment):
        np.testing.assert_array_equal(item["labels"].numpy(), labels)  # the crop is the whole volume
        assert not torch.equal(item["raw"], plain["raw"])
        assert item["raw"].min() >= 0 and item["raw"].max() <= 1


def test_padding_modes_and_the_error_without_padding():
    shape = (4, 30, 30)
    raw, labels = position_volume(shape)
    crop = (8, 32, 32)
    reflect = EMCropDataset(raw, labels, crop_size=crop, augment=False, pad="reflect")[0]
    assert reflect["raw"].shape == (1, *crop)
    assert set(np.unique(reflect["labels"].numpy())) == set(labels.ravel())  # mirrored, nothing added
    np.testing.assert_array_equal(np.rint(reflect["raw"][0].numpy() * 255), raw_of(reflect["labels"].numpy()))
    constant = EMCropDataset(raw, labels, crop_size=crop, augment=False, pad="constant")[0]
    padded = constant["labels"].numpy() == 0
    assert padded.sum() == np.prod(crop) - np.prod(shape)
    assert (constant["raw"][0].numpy()[padded] == 0).all()
    with pytest.raises(ValueError, match=r"shape \(4, 30, 30\) is smaller than the crop \(8, 32, 32\)"):
        EMCropDataset(raw, labels, crop_size=crop, pad=None)
    assert len(EMCropDataset(raw, crop_size=(4, 30, 30), pad=None)) == 1000  # fits exactly: no error


def test_scaling_per_volume_and_per_crop():
    raw16 = np.full((4, 8, 8), 1000, np.uint16)
    raw16[0, 0, 0] = 3000
    item = EMCropDataset(raw16, crop_size=(4, 8, 8), augment=False)[0]["raw"]
    assert (item.min().item(), item.max().item()) == pytest.approx((1000 / 65535, 3000 / 65535))
    floats = np.linspace(-5, 15, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    scaled = (floats + 5) / 20  # the volume's own range, for dtypes other than uint8 / uint16
    windows = [scaled[z : z + 2] for z in range(3)]
    for item in EMCropDataset(floats, crop_size=(2, 8, 8), augment=False, samples_per_epoch=4):
        assert any(np.allclose(item["raw"][0].numpy(), window, atol=1e-6) for window in windows)
    crop = EMCropDataset(floats, crop_size=(2, 8, 8), augment=False, scaling="crop")[5]["raw"]
    assert crop.min().item() == 0 and crop.max().item() == 1
    # Scaling and augmenting work on copies: the volume itself is never changed.
    np.testing.assert_array_equal(floats, np.linspace(-5, 15, 256, dtype=np.float32).reshape(4, 8, 8))


def test_volumes_are_drawn_by_size_and_checked():
    small, large = np.zeros((4, 8, 8), np.uint8), np.full((12, 8, 8), 255, np.uint8)
    dataset = EMCropDataset([small, large], crop_size=(2, 8, 8), augment=False, samples_per_epoch=200)
    share = np.mean([dataset[i]["raw"].max().item() == 1 for i in range(200)])
    assert 0.65 < share < 0.85  # 3/4 of the voxels
    with pytest.raises(ValueError, match="one label volume per raw volume"):
        EMCropDataset([small, large], [small])
    with pytest.raises(ValueError, match=r"labels shape \(12, 8, 8\) differs from raw"):
        EMCropDataset(small, large)
    with pytest.raises(TypeError, match="labels must be integer"):
        EMCropDataset(small, small.astype(np.float32), crop_size=(2, 8, 8))
    nan = np.zeros((4, 8, 8), np.float32)
    nan[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        EMCropDataset(nan, crop_size=(2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        EMCropDataset(nan, crop_size=(4, 8, 8), scaling="crop")[0]
    with pytest.raises(ValueError, match="crop_size must be three positive ints"):
        EMCropDataset(small, crop_size=(0, 8, 8))
    with pytest.raises(ValueError, match="pad must be"):
        EMCropDataset(small, pad="edge")


def test_lazy_files_and_workers_give_the_same_samples(tmp_path, volume):
    raw, labels = volume
    path = write_cremi(tmp_path / "cremi.h5", raw, labels, compression=None)
    options = dict(crop_size=(4, 32, 32), samples_per_epoch=6, seed=5)
    in_memory = EMCropDataset(raw, labels, **options)
    lazy = EMCropDataset(f"{path}:{RAW_KEY}", path, in_memory=False, **options)
    assert isinstance(lazy.volumes[0].raw, LazyVolume)
    loader = DataLoader(lazy, batch_size=3, num_workers=2)
    batches = list(loader)
    assert batches[0]["raw"].shape == (3, 1, 4, 32, 32) and batches[0]["labels"].shape == (3, 4, 32, 32)
    for i in range(6):
        batch, row = divmod(i, 3)
        assert torch.equal(batches[batch]["raw"][row], in_memory[i]["raw"])
        assert torch.equal(batches[batch]["labels"][row], in_memory[i]["labels"])
