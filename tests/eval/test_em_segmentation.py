"""Sliding-window inference, segmenter checkpoints, the segmentation figure and atomic outputs."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from seqvision.data import LazyVolume, open_volume
from seqvision.eval.em import (
    CHECKPOINT_FORMAT,
    SegmenterConfig,
    load_segmenter,
    predict_affinities,
    read_segmenter_config,
    save_segmentation_figure,
    save_segmenter,
)
from seqvision.utils.io import atomic_path


class Pointwise(nn.Module):
    """A 1x1x1 conv + sigmoid: every voxel's output depends on that voxel only, so sliding-window
    inference must reproduce whole-volume inference exactly, borders included."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def whole(model, raw01):
    with torch.no_grad():
        return model(torch.from_numpy(raw01.astype(np.float32))[None, None])[0].numpy()


def tmp_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize(
    ("shape", "window", "overlap", "batch_size"),
    [
        ((21, 50, 37), (8, 16, 16), 0.25, 3),  # no axis a multiple of the stride
        ((5, 40, 40), (8, 16, 16), 0.5, 2),  # z shorter than the window: reflected and cropped
        ((8, 16, 16), (8, 16, 16), 0.25, 1),  # one window
        ((9, 33, 20), (8, 16, 16), (0.0, 0.25, 0.75), 4),  # per-axis overlap
    ],
)
def test_sliding_window_equals_whole_volume_for_a_pointwise_model(shape, window, overlap, batch_size):
    model = Pointwise()
    raw = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = predict_affinities(model, raw, window, overlap, batch_size, progress=False)
    assert out.shape == (3, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out, whole(model, raw / 255.0), atol=1e-6)


def test_float_volumes_are_min_max_scaled_and_intensity_range_overrides():
    model = Pointwise()
    raw = np.random.default_rng(1).normal(100.0, 20.0, (8, 20, 20)).astype(np.float32)
    out = predict_affinities(model, raw, (8, 16, 16), progress=False)
    np.testing.assert_allclose(out, whole(model, (raw - raw.min()) / (raw.max() - raw.min())), atol=1e-6)
    out = predict_affinities(model, raw, (8, 16, 16), progress=False, intensity_range=(50.0, 150.0))
    np.testing.assert_allclose(out, whole(model, np.clip((raw - 50) / 100, 0, 1)), atol=1e-6)


def test_lazy_input_and_hdf5_output_give_the_in_memory_result(tmp_path):
    model = Pointwise()
    raw = np.random.default_rng(2).integers(0, 256, (12, 40, 40), dtype=np.uint8)
    expected = predict_affinities(model, raw, (8, 16, 16), batch_size=2, progress=False)
    with h5py.File(tmp_path / "raw.h5", "w") as file:
        file["volumes/raw"] = raw
    lazy = open_volume(f"{tmp_path / 'raw.h5'}:volumes/raw")
    assert isinstance(lazy, LazyVolume)
    with h5py.File(tmp_path / "out.h5", "w") as file:
        dataset = file.create_dataset("affinities", shape=(3, *raw.shape), dtype="f4", chunks=(3, 8, 16, 16))
        dataset[...] = 7.0  # whatever was there is overwritten, not added to
        result = predict_affinities(model, lazy, (8, 16, 16), batch_size=2, progress=False, out=dataset)
        assert result is dataset
        np.testing.assert_allclose(dataset[...], expected, atol=1e-6)
    np.testing.assert_allclose(
        predict_affinities(model, str(tmp_path / "raw.h5"), (8, 16, 16), progress=False), expected, atol=1e-6
    )


def test_gaussian_blending_weights_window_centres_over_borders():
    class WindowIndex(nn.Module):
        """Outputs, everywhere in a window, how many windows it has seen: tells which window won."""

        calls = 0

        def forward(self, x):
            WindowIndex.calls += 1
            return torch.full((x.shape[0], 1, *x.shape[2:]), float(WindowIndex.calls))

    raw = np.zeros((1, 1, 24), dtype=np.uint8)
    out = predict_affinities(WindowIndex(), raw, (1, 1, 16), overlap=0.5, progress=False)[0, 0, 0]
    # Windows [0, 16) -> 1 and [8, 24) -> 2. Outside the overlap only one window counts; inside it
    # the blend moves from 1 to 2, passing 1.5 at the middle of the overlap.
    np.testing.assert_allclose(out[:8], 1.0)
    np.testing.assert_allclose(out[16:], 2.0)
    assert np.all(np.diff(out[8:16]) > 0) and out[11] < 1.5 < out[12]


def test_tiny_segmenter_one_window_is_exact_and_its_mode_is_restored(tiny_config):
    torch.manual_seed(0)
    model = tiny_config.build().train()
    raw = np.random.default_rng(3).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    out = predict_affinities(model, raw, (16, 32, 32), progress=False)
    assert model.training
    model.eval()
    np.testing.assert_allclose(out, whole(model, raw / 255.0), atol=1e-6)
    tiled = predict_affinities(model, np.tile(raw, (1, 1, 2)), (16, 32, 32), overlap=0.5, progress=False)
    assert tiled.shape == (3, 16, 32, 64) and tiled.min() > 0 and tiled.max() < 1


def test_bad_volumes_windows_and_models_are_clear_errors(tiny_config):
    model = Pointwise()
    raw = np.random.default_rng(4).random((8, 16, 16)).astype(np.float32)
    raw[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict_affinities(model, raw, (8, 16, 16), progress=False)
    with pytest.raises(ValueError, match="NaN"):  # also when no scan for the range is needed
        predict_affinities(model, raw, (8, 16, 16), progress=False, intensity_range=(0, 1))
    with pytest.raises(ValueError, match="3-D"):
        predict_affinities(model, np.zeros((16, 16), np.uint8), (8, 16, 16), progress=False)
    with pytest.raises(ValueError, match="window must be three positive ints"):
        predict_affinities(model, np.zeros((8, 16, 16), np.uint8), (8, 16), progress=False)
    with pytest.raises(ValueError, match="divisible by 16"):
        predict_affinities(tiny_config.build(), np.zeros((8, 16, 16), np.uint8), (8, 16, 16), progress=False)
    with pytest.raises(ValueError, match="overlap"):
        predict_affinities(model, np.zeros((8, 16, 16), np.uint8), (8, 16, 16), overlap=1.0, progress=False)
    with pytest.raises(ValueError, match=r"out must have shape"):
        predict_affinities(model, np.zeros((8, 16, 16), np.uint8), (8, 16, 16), out=np.zeros((3, 8, 16, 15)))

    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3, *x.shape[2:]), float("nan"))

    with pytest.raises(ValueError, match="model returned NaN"):
        predict_affinities(Broken(), np.zeros((8, 16, 16), np.uint8), (8, 16, 16), progress=False)


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tiny_config, tiny_checkpoint):
    assert read_segmenter_config(tiny_checkpoint) == tiny_config
    torch.manual_seed(0)
    original = tiny_config.build().eval()  # the fixture's weights: same seed
    loaded = load_segmenter(tiny_checkpoint)
    assert not loaded.training
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == CHECKPOINT_FORMAT and json.loads(metadata["config"])["hidden_size"] == 16


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_mismatch(tmp_path, tiny_checkpoint):
    wider = SegmenterConfig(hidden_size=16, encoder_kwargs=dict(dims=(8, 8, 8, 16), depths=(0, 0, 0, 1)))
    with pytest.raises(ValueError, match=r"do not fit the architecture.*shapes: .*encoder\.stages\.3"):
        load_segmenter(tiny_checkpoint, wider)
    # An encoder-only file (pretraining output) with a segmenter's config: the decoder is missing.
    encoder_only = {k: v for k, v in load_file(tiny_checkpoint).items() if k.startswith("encoder.")}
    save_file(encoder_only, tmp_path / "encoder.safetensors")
    (tmp_path / "encoder.json").write_text(json.dumps(read_segmenter_config(tiny_checkpoint).to_dict()))
    with pytest.raises(ValueError, match=r"missing keys: .*skip_blocks"):
        load_segmenter(tmp_path / "encoder.safetensors")
    with pytest.raises(ValueError, match="does not match config"):
        save_segmenter(wider.build(), tmp_path / "x.safetensors", read_segmenter_config(tiny_checkpoint))
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_without_metadata_load_with_a_sidecar_or_an_explicit_config(
    tmp_path, tiny_config, tiny_checkpoint
):
    # What the training loop writes for an AffinityModel: the segmenter's keys under 'segmenter.'.
    state = {f"segmenter.{k}": v for k, v in load_file(tiny_checkpoint).items()}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not name its architecture"):
        load_segmenter(tmp_path / "model.safetensors")
    assert isinstance(load_segmenter(tmp_path / "model.safetensors", tiny_config.to_dict()), nn.Module)
    (tmp_path / "model.yaml").write_text(json.dumps(tiny_config.to_dict()))  # JSON is YAML
    assert isinstance(load_segmenter(tmp_path / "model.safetensors"), nn.Module)


def test_unreadable_checkpoints_are_clear_errors(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_segmenter(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot be read as a safetensors"):
        load_segmenter(tmp_path / "junk.safetensors", tiny_config)
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "x", "config": "{}"})
    with pytest.raises(ValueError, match=r"is not 'seqvision\.em_segmenter'"):
        load_segmenter(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unknown segmenter option"):
        SegmenterConfig.from_dict({"encoder": "emmamba_base"})


# ------------------------------------------------------------------------------------ figure and files


def test_segmentation_figure_is_written(tmp_path):
    from matplotlib.image import imread

    rng = np.random.default_rng(5)
    labels = rng.integers(1, 5, (6, 24, 24)).astype(np.uint64)
    raw = rng.integers(0, 256, labels.shape, dtype=np.uint8)
    affinities = rng.random((3, *labels.shape)).astype(np.float32)
    path = save_segmentation_figure(tmp_path / "seg.png", raw, affinities, labels, labels, slices=[0, 5])
    image = imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # 4 panels wide, 2 sections high
    save_segmentation_figure(tmp_path / "no_gt.png", raw, affinities, labels, title="prediction")
    assert tmp_files(tmp_path) == []
    with pytest.raises(ValueError, match="slices"):
        save_segmentation_figure(tmp_path / "bad.png", raw, affinities, labels, slices=[6])
    with pytest.raises(ValueError, match="affinities must be"):
        save_segmentation_figure(tmp_path / "bad.png", raw, affinities[:, 1:], labels)


def test_atomic_path_leaves_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and tmp_files(tmp_path) == []
    with atomic_path(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and tmp_files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no such folder"), atomic_path(tmp_path / "nope" / "x.json"):
        pass
