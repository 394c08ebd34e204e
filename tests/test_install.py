"""The lean core install: ``pip install seqvision`` without extras runs every model, and a task that
needs an extra says which one.

A fresh virtual environment gets exactly the distributions that the core requirements of
pyproject.toml pull in (the closure over their own requirements), taken from this environment's
installed files by symlink rather than reinstalled from the wheel cache (a CUDA build of torch is
several GB: copying it would cost minutes of the suite), and this checkout on its path. Nothing of
the extras (h5py, scipy, decord, pycocoevalcap, matplotlib, scikit-learn, tensorboard) is there,
unless a core dependency itself requires it.
"""

from __future__ import annotations

import os
import subprocess
import venv
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = (
    "h5py",
    "zarr",
    "tifffile",
    "skimage",
    "scipy",
    "waterz",
    "decord",
    "pycocoevalcap",
    "sklearn",
)


def core_distributions() -> dict[str, metadata.Distribution]:
    """The installed distributions the core requirements need, transitively (markers evaluated for
    this interpreter, no extras)."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in found:
            continue
        distribution = metadata.distribution(requirement.name)
        found[name] = distribution
        todo.extend(Requirement(r) for r in distribution.requires or ())
    return found


def build_core_environment(folder: Path) -> Path:
    """A virtual environment holding the core distributions and this checkout; returns its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for distribution in core_distributions().values():
        tops = {Path(str(f)).parts[0] for f in distribution.files or () if not str(f).startswith("..")}
        for top in tops:
            source = Path(distribution.locate_file(top))
            target = site / top
            if source.exists() and not target.exists() and top != "__pycache__":
                target.symlink_to(source)
    (site / "seqvision_checkout.pth").write_text(f"{ROOT}\n")
    return python


@pytest.fixture(scope="module")
def core_python(tmp_path_factory):
    return build_core_environment(tmp_path_factory.mktemp("core") / "venv")


def run(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env, check=False
    )


@pytest.mark.slow
def test_the_core_environment_has_none_of_the_extras(core_python):
    script = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    result = run(core_python, "-c", script, *EXTRA_MODULES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_every_registered_model_is_created_with_the_core_alone(core_python):
    script = """
import timm, torch
import seqvision
from timm.models._registry import _model_entrypoints
names = sorted(n for n, fn in _model_entrypoints.items() if fn.__module__.startswith("seqvision."))
for name in names:
    with torch.device("meta"):
        timm.create_model(name)
model = timm.create_model("vir_tiny_patch16_224", img_size=32, depth=1).eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
print(",".join(names))
"""
    import timm
    from timm.models._registry import _model_entrypoints

    import seqvision  # noqa: F401  (registers the models here too, with every extra installed)

    result = run(core_python, "-c", script)
    assert result.returncode == 0, result.stderr
    here = sorted(n for n, fn in _model_entrypoints.items() if fn.__module__.startswith("seqvision."))
    assert result.stdout.strip().split(",") == here
    assert len(here) == len([n for n in timm.list_models() if n in here])


@pytest.mark.slow
def test_an_em_command_says_which_extra_it_needs(core_python, tmp_path):
    result = run(core_python, "-m", "seqvision", "synth-em", str(tmp_path / "volume.h5"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "seqvision synth-em:" in result.stderr and "pip install 'seqvision[em]'" in result.stderr
    assert not (tmp_path / "volume.h5").exists()
    help_text = run(core_python, "-m", "seqvision", "--help")
    assert help_text.returncode == 0 and "finetune-seg" in help_text.stdout
