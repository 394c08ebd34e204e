"""Shared fixtures for the EM segmentation tests."""

import pytest

from seqvision.eval.em import SegmenterConfig, save_segmenter


@pytest.fixture(scope="session")
def tiny_config():
    """A segmenter small enough for the CPU: widths 8, one Mamba layer, in the last stage (a few
    tokens), so every kind of block still runs."""
    return SegmenterConfig(hidden_size=16, encoder_kwargs=dict(dims=(8, 8, 8, 8), depths=(0, 0, 0, 1)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    """A randomly initialised tiny segmenter, saved with save_segmenter."""
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    return save_segmenter(tiny_config.build(), path, tiny_config)
