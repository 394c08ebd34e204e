"""vision.weights: reading checkpoints without running their code, unwrapping, the first key that
does not fit, the converter registry, and `seqvision convert` end to end on an authors' Vim file."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from upstream_fixtures import assert_close_relative, load_fixture

import seqvision  # noqa: F401  (registers the models and their converters)
from seqvision.cli import main
from seqvision.vision.weights import (
    OpaqueObject,
    convert_checkpoint,
    converter_for,
    first_mismatch,
    read_checkpoint,
    register_converter,
    registered_converters,
    unwrap_state_dict,
)


class Payload:
    """Unpickling an instance calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_foreign_checkpoint(tmp_path):
    """A torch.save file holding tensors and objects of a module the reader cannot import."""
    module = tmp_path / "foreign_config.py"
    module.write_text(
        textwrap.dedent(
            """
            class CfgNode(dict):
                def __init__(self, values=None):
                    super().__init__(values or {})
                    self.__dict__["frozen"] = True
            """
        )
    )
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import foreign_config
        config = foreign_config.CfgNode({{"MODEL": foreign_config.CfgNode({{"NAME": "vssm"}})}})
        checkpoint = {{"model": {{"w": torch.arange(3.0)}}, "config": config, "epoch": 7}}
        torch.save(checkpoint, {str(tmp_path / "foreign.pth")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    module.unlink()  # the class is gone: nothing may import it when the file is read
    return tmp_path / "foreign.pth"


def test_read_checkpoint_keeps_tensors_and_makes_foreign_objects_inert(tmp_path):
    checkpoint = read_checkpoint(write_foreign_checkpoint(tmp_path))
    assert torch.equal(checkpoint["model"]["w"], torch.arange(3.0))
    assert checkpoint["epoch"] == 7
    config = checkpoint["config"]
    assert isinstance(config, OpaqueObject) and config.qualified_name == "foreign_config.CfgNode"
    assert isinstance(config["MODEL"], OpaqueObject)  # its items are kept, for inspection
    assert "foreign_config" not in sys.modules


def test_read_checkpoint_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.ones(2)}, "payload": Payload(str(marker))}, tmp_path / "hostile.pth")
    with pytest.raises(pickle.UnpicklingError):  # torch's own weights-only reader refuses the file
        torch.load(tmp_path / "hostile.pth", weights_only=True)
    checkpoint = read_checkpoint(tmp_path / "hostile.pth")
    assert not marker.exists()
    assert isinstance(checkpoint["payload"], OpaqueObject)
    assert torch.equal(checkpoint["model"]["w"], torch.ones(2))


def test_read_checkpoint_reads_safetensors_and_legacy_files_and_names_bad_ones(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["a"], torch.ones(2))
    torch.save({"b": torch.zeros(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(tmp_path / "legacy.pt")["b"], torch.zeros(3))
    with pytest.raises(FileNotFoundError, match="checkpoint must be an existing file"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pth' could not be read as a torch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save(torch.ones(2), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="must hold a dict"):
        read_checkpoint(tmp_path / "tensor.pth")


def test_unwrap_state_dict_finds_the_weights_inside_training_checkpoints():
    weights = {"w": torch.ones(1)}
    ema = {"w": torch.zeros(1)}
    assert unwrap_state_dict({"model": weights, "model_ema": ema, "epoch": 3}) == weights
    assert unwrap_state_dict({"model": weights, "model_ema": ema}, use_ema=True) == ema
    assert unwrap_state_dict({"state_dict": {"module": weights}}) == weights
    assert unwrap_state_dict({"module.w": torch.ones(1)}).keys() == {"w"}
    assert unwrap_state_dict(weights) == weights and unwrap_state_dict(weights) is not weights


def test_first_mismatch_names_the_first_key_and_why():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    assert first_mismatch(dict(expected), expected) == ""
    assert first_mismatch({"b": torch.zeros(3), "c": torch.zeros(1)}, expected).startswith(
        "first key that does not fit: 'a' (the model has it, the file does not)"
    )
    shapes = first_mismatch({"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.zeros(1)}, expected)
    assert shapes.startswith("first key that does not fit: 'b' (file (4,) vs model (3,))")
    extra = first_mismatch({**expected, "aa": torch.zeros(1)}, expected)
    assert "'aa' (the file has it, the model does not)" in extra


def test_every_family_with_published_weights_has_a_converter():
    for name in ("vim_tiny_patch16_224", "vmamba_tiny_s1l8_224", "emmamba_base", "lrcn_caffenet"):
        assert converter_for(name).filter_fn is not None
    with pytest.raises(ValueError, match=r"model must be a name that a converter serves \(.*vim_\*"):
        converter_for("resnet18")
    assert "vim_*" in registered_converters()


def test_register_converter_replaces_a_pattern_and_serves_convert_checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("resnet10t", num_classes=3)
    flipped = {k: -v if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    torch.save({"network": flipped}, tmp_path / "r.pth")

    def unflip(raw, model):
        return {k: -v if v.is_floating_point() else v for k, v in raw["network"].items()}

    try:
        register_converter("resnet10t", unflip)
        register_converter("resnet10t", unflip)  # once per pattern
        assert registered_converters().count("resnet10t") == 1
        model, state = convert_checkpoint(tmp_path / "r.pth", "resnet10t", num_classes=3)
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
        assert not model.training
    finally:
        from seqvision.vision import weights

        weights._CONVERTERS[:] = [c for c in weights._CONVERTERS if c.pattern != "resnet10t"]


# ------------------------------------------------------------------------------------------------
# seqvision convert, on the authors' Vim file made from the upstream fixture
# ------------------------------------------------------------------------------------------------


def authors_vim_file(tmp_path, transform=None):
    upstream = load_fixture("vim_patch16")
    state = upstream.state_dict if transform is None else transform(upstream.state_dict)
    path = tmp_path / "vim_t_midclstok_tiny.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="vim_tiny")}, path)
    arch = {k: upstream.config[k] for k in ("img_size", "embed_dim", "depth", "num_classes")}
    return path, upstream, arch


def test_convert_command_writes_a_file_timm_loads_with_the_authors_logits(tmp_path, capsys):
    source, upstream, arch = authors_vim_file(tmp_path)
    output = tmp_path / "vim.safetensors"
    args = [f"--arg={k}={v}" for k, v in arch.items()]
    assert main(["convert", str(source), str(output), "--model", "vim_tiny_patch16_224", *args]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    with safe_open(str(output), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "vim_tiny_patch16_224" and meta["source"] == source.name
    # timm keeps a file's classifier when the cfg's class count is the model's.
    overlay = dict(file=str(output), num_classes=arch["num_classes"])
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **arch)
    model.eval()
    with torch.no_grad():
        assert_close_relative(model(upstream.inputs["x"]), upstream.outputs["logits"], rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_convert_command_names_the_key_that_does_not_fit_and_writes_nothing(tmp_path, capsys):
    def shrink(state):
        return {k: v[:, :40] if k == "layers.0.mixer.in_proj.weight" else v for k, v in state.items()}

    source, _, arch = authors_vim_file(tmp_path, shrink)
    output = tmp_path / "vim.safetensors"
    args = [f"--arg={k}={v}" for k, v in arch.items()]
    assert main(["convert", str(source), str(output), "--model", "vim_tiny_patch16_224", *args]) == 2
    err = capsys.readouterr().err
    assert "seqvision convert:" in err and "'blocks.0.mixer.in_proj.weight'" in err
    assert not output.exists()
    assert main(["convert", str(source), str(output), "--model", "resnet18"]) == 2
    assert "model must be a name that a converter serves" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(source), str(output), "--model", "vim_tiny_patch16_224", "--arg", "depth"])
