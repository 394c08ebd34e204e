"""The TokenUnify authors' checkpoints (ydchen0806/TokenUnify): their segmenter and encoder, converted
by ``checkpoint_filter_fn``, against the outputs of their own code (fixture from
tools/upstream/tokenunify.py) through the segmenter path, timm's file and hub paths and
``convert_checkpoint``; the architecture read from a file; broken files named; the published tags."""

import argparse

import pytest
import timm
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import save_file
from upstream_fixtures import assert_close_relative, load_fixture

import seqvision  # noqa: F401  (registers the models)
from seqvision.vision import create_em_segmenter, em
from seqvision.vision.em import (
    EM_SEGMENTER_WEIGHTS,
    TOKENUNIFY_LAYER,
    em_architecture,
    list_em_segmenters,
    load_encoder_weights,
)
from seqvision.vision.weights import convert_checkpoint, read_checkpoint

TAGS = {
    "emmamba_small": "100M",
    "emmamba_mid": "200M",
    "emmamba_large": "500M",
    "emmamba_huge": "1B",
}


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("tokenunify_segmamba")


@pytest.fixture(scope="module")
def arch(fixture):
    """The fixture's architecture as the encoder's keyword arguments, from its config (not the reader)."""
    config = fixture.config
    return dict(dims=tuple(config["feat_size"]), depths=tuple(config["depths"]), **TOKENUNIFY_LAYER)


def save_authors_checkpoint(state, path):
    """The authors' training checkpoint packing (util_mamba/misc.py save_model)."""
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "epoch": 399,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="segmamba", batch_size=6),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory, fixture):
    return save_authors_checkpoint(
        fixture.state_dict, tmp_path_factory.mktemp("tokenunify") / "checkpoint-399.pth"
    )


@pytest.fixture(scope="module")
def segmenter(authors_file):
    return create_em_segmenter("emmamba_small", pretrained=authors_file).eval()


def relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# against the authors' outputs
# ------------------------------------------------------------------------------------------------


def test_fixture_records_the_authors_configuration(fixture):
    assert fixture.upstream_repo == "ydchen0806/TokenUnify"
    assert len(fixture.upstream_commit) == 40
    # their Mamba's nslices (5) differs from every stage's real slice count (8, 4, 2, 1)
    assert fixture.config["nslices"] == [5] and fixture.config["volume"][2] == 16
    assert "vit.stages.1.1.mamba.A_s_log" in fixture.state_dict
    assert "decoder5.transp_conv.conv.weight" in fixture.state_dict


def test_authors_segmenter_matches_their_outputs(fixture, segmenter):
    x = fixture.inputs["x"]
    with torch.no_grad():
        logits = segmenter.forward_logits(x)
        skips = segmenter.encoder.forward_intermediates(x, intermediates_only=True)
    print(f"TokenUnify segmenter: logits relative error {relative(logits, fixture.outputs['logits']):.2e}")
    assert_close_relative(logits, fixture.outputs["logits"])
    for i, skip in enumerate(skips):
        assert_close_relative(skip, fixture.outputs[f"skip{i}"])
    assert segmenter.out_chans == 3 and segmenter.hidden_size == 24
    assert not segmenter.encoder.mamba_residual and segmenter.encoder.inter_slice_chunks == 5


def test_authors_encoder_loads_through_timm(fixture, authors_file, arch):
    # The tag builds the authors' layer; the tiny widths are given, as the fixture is tiny.
    encoder = timm.create_model(
        "emmamba_small.tokenunify_pretrained_100m",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(authors_file)),
        dims=arch["dims"],
        depths=arch["depths"],
    ).eval()
    assert not encoder.mamba_residual and encoder.inter_slice_chunks == 5
    with torch.no_grad():
        skips = encoder.forward_intermediates(fixture.inputs["x"], intermediates_only=True)
    errors = [relative(skip, fixture.outputs[f"skip{i}"]) for i, skip in enumerate(skips)]
    print("TokenUnify encoder: skip relative errors " + ", ".join(f"{e:.2e}" for e in errors))
    for i, skip in enumerate(skips):
        assert_close_relative(skip, fixture.outputs[f"skip{i}"])


def test_authors_encoder_loads_into_a_segmenter_as_pretrained_encoder(fixture, authors_file, arch):
    segmenter = create_em_segmenter("emmamba_small", authors_file, hidden_size=16, **arch).eval()
    with torch.no_grad():
        final = segmenter.encoder.forward_features(fixture.inputs["x"])
    assert_close_relative(final, fixture.outputs["skip3"])


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------


def test_convert_checkpoint_gives_the_loaded_state(authors_file, segmenter, arch):
    model, state = convert_checkpoint(authors_file, "em_segmenter")  # sized from the file
    assert type(model).__name__ == "EMSegMamba"
    expected = segmenter.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    encoder, state = convert_checkpoint(authors_file, "emmamba_small")
    assert (encoder.dims, encoder.depths) == (arch["dims"], arch["depths"])
    assert not encoder.mamba_residual and encoder.inter_slice_chunks == 5
    encoder_state = {k.removeprefix("encoder."): v for k, v in expected.items() if k.startswith("encoder.")}
    assert state.keys() == encoder_state.keys()
    assert all(torch.equal(state[k], v) for k, v in encoder_state.items())


def test_routes_are_stacked_raster_reversed_inter_slice(fixture, segmenter):
    mixer = segmenter.encoder.stages[1].blocks[1].mixer
    authors = "vit.stages.1.1.mamba."
    for route, (A, D, conv) in enumerate(
        [("A_log", "D", "conv1d"), ("A_b_log", "D_b", "conv1d_b"), ("A_s_log", "D_s", "conv1d_s")]
    ):
        assert torch.equal(mixer.A_log[route], fixture.state_dict[authors + A])
        assert torch.equal(mixer.D[route], fixture.state_dict[authors + D])
        E = mixer.inner
        assert torch.equal(
            mixer.conv.weight[route * E : (route + 1) * E], fixture.state_dict[authors + conv + ".weight"]
        )


def test_architecture_is_read_from_the_file(fixture, arch, authors_file):
    config = fixture.config
    expected = dict(
        arch, in_chans=1, d_state=16, d_conv=4, expand=2, hidden_size=config["hidden_size"],
        out_chans=config["out_chans"], kernel_size=tuple(config["kernel_size"]),
    )  # fmt: skip
    assert em_architecture(fixture.state_dict) == expected
    assert em_architecture(read_checkpoint(authors_file)) == expected  # the whole training checkpoint
    bare_encoder = {k.removeprefix("vit."): v for k, v in fixture.state_dict.items() if k.startswith("vit.")}
    assert em_architecture(bare_encoder) == {k: v for k, v in expected.items() if k not in em._DECODER_ARGS}
    # seqvision's layouts: a segmenter, a Mamba-2 encoder with a classifier
    torch.manual_seed(0)
    mine = create_em_segmenter("emmamba_base", dims=(8, 8, 16, 16), depths=(0, 1, 2, 1), hidden_size=20)
    assert em_architecture(mine.state_dict()) == dict(
        dims=(8, 8, 16, 16), depths=(0, 1, 2, 1), in_chans=1, d_state=16, d_conv=4, expand=2,
        hidden_size=20, out_chans=3, kernel_size=(1, 5, 5),
    )  # fmt: skip
    v2 = timm.create_model(
        "emmamba_base", dims=(8, 16, 16, 16), version=2, head_dim=4, d_state=6, num_classes=7
    )
    assert em_architecture({"state_dict": v2.state_dict()}) == dict(
        dims=(8, 16, 16, 16), depths=(2, 2, 2, 2), in_chans=1, d_state=6, d_conv=4, expand=2, version=2,
        head_dim=4, num_classes=7,
    )  # fmt: skip
    with pytest.raises(ValueError, match="state_dict must be an EM encoder or segmenter checkpoint"):
        em_architecture({"patch_embed.proj.weight": torch.zeros(1)})


def test_seqvision_layout_files_still_load(tmp_path):
    torch.manual_seed(0)
    mine = create_em_segmenter(
        "emmamba_base", dims=(8, 12, 16, 24), depths=(1, 1, 1, 1), hidden_size=20
    ).eval()
    save_file(mine.state_dict(), tmp_path / "segmenter.safetensors")
    again = create_em_segmenter("emmamba_base", pretrained=tmp_path / "segmenter.safetensors")
    assert again.encoder.mamba_residual and again.encoder.inter_slice_chunks is None
    _, state = convert_checkpoint(tmp_path / "segmenter.safetensors", "em_segmenter")
    for loaded in (again.state_dict(), state):
        assert all(torch.equal(loaded[k], v) for k, v in mine.state_dict().items())


def test_authors_stem_is_adapted_to_in_chans(fixture, authors_file, arch):
    encoder = timm.create_model(
        "emmamba_small.tokenunify_pretrained_100m",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(authors_file)),
        in_chans=2,
        **arch,
    )
    stem = fixture.state_dict["vit.downsample_layers.0.0.weight"]
    assert torch.equal(encoder.stem.weight, stem.repeat(1, 2, 1, 1, 1) / 2)


# ------------------------------------------------------------------------------------------------
# broken files and wrong models
# ------------------------------------------------------------------------------------------------


def test_a_renamed_route_twin_is_named(fixture, tmp_path):
    state = dict(fixture.state_dict)
    state["vit.stages.1.1.mamba.x_proj_z.weight"] = state.pop("vit.stages.1.1.mamba.x_proj_s.weight")
    path = save_authors_checkpoint(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"lacks 'vit\.stages\.1\.1\.mamba\.x_proj_s\.weight'"):
        convert_checkpoint(path, "em_segmenter")
    with pytest.raises(ValueError, match=r"lacks 'vit\.stages\.1\.1\.mamba\.x_proj_s\.weight'"):
        create_em_segmenter("emmamba_small", pretrained=path)


def test_a_reshaped_or_unknown_key_is_named(fixture, tmp_path):
    state = dict(fixture.state_dict)
    state["decoder3.conv_block.conv1.conv.weight"] = state["decoder3.conv_block.conv1.conv.weight"][
        :, :, :, :1
    ]
    path = save_authors_checkpoint(state, tmp_path / "reshaped.pth")
    with pytest.raises(
        ValueError, match=r"'up_blocks\.2\.conv_block\.conv1\.weight' \(file \(12, 24, 1, 1, 3\)"
    ):
        convert_checkpoint(path, "em_segmenter")
    state = dict(fixture.state_dict)
    state["vit.stages.0.0.mamba.D_s"] = state["vit.stages.0.0.mamba.D_s"][:3]
    path = save_authors_checkpoint(state, tmp_path / "twin.pth")
    with pytest.raises(ValueError, match=r"'vit\.stages\.0\.0\.mamba\.D_s' has shape \(3,\)"):
        convert_checkpoint(path, "emmamba_small")
    state = dict(fixture.state_dict, **{"vit.gscs.0.proj5.weight": torch.zeros(1)})
    path = save_authors_checkpoint(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"'gscs\.0\.proj5\.weight' \(the file has it"):
        convert_checkpoint(path, "emmamba_small")


def test_a_model_without_the_authors_layer_or_size_is_refused(authors_file, arch):
    overlay = dict(file=str(authors_file))
    with pytest.raises(ValueError, match=r"mamba_residual=False, inter_slice_chunks=5"):
        timm.create_model(
            "emmamba_small",
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            **dict(arch, mamba_residual=True),
        )
    with pytest.raises(
        ValueError, match=r"depths=\(1, 2, 1, 1\).*the model was built with dims=\(64, 128, 256, 512\)"
    ):
        timm.create_model(
            "emmamba_small.tokenunify_pretrained_100m", pretrained=True, pretrained_cfg_overlay=overlay
        )
    encoder = timm.create_model("emmamba_small", dims=arch["dims"], depths=arch["depths"])
    with pytest.raises(ValueError, match="TokenUnify authors' encoder"):
        load_encoder_weights(encoder, authors_file)


def test_segmenter_argument_errors(fixture, authors_file, tmp_path):
    with pytest.raises(ValueError, match="pretrained=True downloads a published segmenter"):
        create_em_segmenter("emmamba_small", pretrained=True)
    with pytest.raises(ValueError, match="encoder_name's tag must be a published segmenter's"):
        create_em_segmenter("emmamba_small.tokenunify_7b", pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        create_em_segmenter("emmamba_small", authors_file, pretrained=authors_file)
    with pytest.raises(FileNotFoundError, match="pretrained must be True or an existing file"):
        create_em_segmenter("emmamba_small", pretrained=tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="pretrained must be a bool or a path"):
        create_em_segmenter("emmamba_small", pretrained=3)
    bare = {k.removeprefix("vit."): v for k, v in fixture.state_dict.items() if k.startswith("vit.")}
    path = save_authors_checkpoint(bare, tmp_path / "encoder.pth")
    with pytest.raises(ValueError, match="holds an encoder only: pass it as pretrained_encoder"):
        create_em_segmenter("emmamba_small", pretrained=path)
    with pytest.raises(ValueError, match="holds an encoder only"):
        convert_checkpoint(path, "em_segmenter")


# ------------------------------------------------------------------------------------------------
# published tags
# ------------------------------------------------------------------------------------------------


def test_encoder_tags_are_listed_with_their_hub_files():
    assert timm.list_pretrained("emmamba_*") == sorted(
        f"{name}.tokenunify_pretrained_{size.lower()}" for name, size in TAGS.items()
    )
    for name, size in TAGS.items():
        cfg = timm.get_pretrained_cfg(f"{name}.tokenunify_pretrained_{size.lower()}")
        assert cfg.hf_hub_id == "cyd0806/TokenUnify"
        assert cfg.hf_hub_filename == f"Pretrained_weights/TokenUnify_pretrained-{size}.pth"
        assert cfg.num_classes == 0 and cfg.license == "unknown" and not cfg.custom_load
        assert cfg.input_size == (1, 160, 160) and cfg.mean == (0.0,) and cfg.std == (1.0,)
        assert "(B, 1, Z, Y, X)" in cfg.description and "16 x 160 x 160" in cfg.description
        # a name without a tag is still seqvision's own layer, with no hosted weights
        default = timm.get_pretrained_cfg(name)
        assert default.tag is None and not default.has_weights
    with torch.device("meta"):
        assert timm.create_model("emmamba_small").mamba_residual
        tagged = timm.create_model("emmamba_small.tokenunify_pretrained_100m")
    assert not tagged.mamba_residual and tagged.inter_slice_chunks == 5


def test_segmenter_tags_are_listed_with_their_hub_files():
    assert list_em_segmenters() == sorted(f"{name}.tokenunify_{size.lower()}" for name, size in TAGS.items())
    assert list_em_segmenters("*_huge.*") == ["emmamba_huge.tokenunify_1b"]
    for name, size in TAGS.items():
        weights = EM_SEGMENTER_WEIGHTS[f"{name}.tokenunify_{size.lower()}"]
        assert weights["hf_hub_id"] == "cyd0806/TokenUnify"
        assert weights["hf_hub_filename"] == f"TokenUnify-{size}.pth"
        assert weights["license"] == "unknown" and weights["model_args"] == TOKENUNIFY_LAYER
        assert "(B, 1, Z, Y, X)" in weights["description"]


def test_tags_load_their_hub_files(monkeypatch, authors_file, segmenter, fixture, arch):
    # The hub download is replaced by the local copy of the authors' file: the tag's (repo, file)
    # is what would be fetched, and what comes back goes the same way as a local file.
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if filename.endswith(".safetensors"):  # timm looks for a safetensors twin first
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(authors_file)

    monkeypatch.setattr(em, "hf_hub_download", download)
    loaded = create_em_segmenter("emmamba_small.tokenunify_100m", pretrained=True)
    assert asked == [("cyd0806/TokenUnify", "TokenUnify-100M.pth")]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in segmenter.state_dict().items())

    import timm.models._hub as timm_hub

    asked.clear()
    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    encoder = timm.create_model("emmamba_mid.tokenunify_pretrained_200m", pretrained=True, **arch)
    assert asked[-1] == ("cyd0806/TokenUnify", "Pretrained_weights/TokenUnify_pretrained-200M.pth")
    expected = {
        k.removeprefix("encoder."): v for k, v in segmenter.state_dict().items() if k.startswith("encoder.")
    }
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in expected.items())
