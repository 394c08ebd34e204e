"""Fixtures from the VMamba authors' own model (MzeroMiko/VMamba, ``classification/models/vmamba.py``).

Usage::

    git clone /work/.mirror/MzeroMiko+VMamba/repo /tmp/upstream/VMamba   # or any checkout
    python tools/upstream/vmamba.py --upstream /tmp/upstream/VMamba

Writes ``tests/vision/fixtures/vmamba_v0.safetensors`` and ``vmamba_v2.safetensors``: the authors' ``VSSM``
at two tiny seeded configurations, every parameter perturbed with seeded noise (their initialisation
leaves LayerNorms at 1/0, D at 1 and A at -1..-N, which would hide a swapped or mis-reshaped tensor),
their float32 forward on a seeded non-square input, and their logits.

* ``vmamba_v0``: the first version (``forward_type='v0'``): z-gated SS2D, 4x4 patch stem, Swin patch
  merging, LayerNorm (channels last), no MLP. d_state 4.
* ``vmamba_v2``: the released v2/v3 family's architecture (the s1l8 / s2l5 configs):
  ``forward_type='v05_noz'`` (no gate), d_state 1, bias-free depthwise conv, the two-conv stem
  (``patchembed_version='v2'``), the 3x3 stride-2 conv downsample (``downsample_version='v3'``), MLP
  ratio 4, LayerNorm2d with channels first (``norm_layer='ln2d'``).

The input is 32 x 48 pixels, so every stage's grid is non-square (rows and columns cannot be confused)
and the last merge sees an odd grid (2 x 3, padded).

Their pure-PyTorch paths run: on the CPU ``cross_scan_fn`` / ``cross_merge_fn`` take the torch
``CrossScanF`` / ``CrossMergeF`` (the Triton kernels are only chosen for CUDA tensors), and
``selective_scan_fn`` falls back to ``selective_scan_torch`` (a step-by-step loop) when none of the
CUDA extensions (``selective_scan_cuda_oflex`` / ``_core`` / ``selective_scan_cuda``) imports; they
import those inside try/except, so nothing needs stubbing for them. Stubbed (import-time only, never
called on these paths): ``fvcore`` (``fvcore.nn``: FLOP counting in ``VSSM.flops``) and ``einops``
(``rearrange`` / ``repeat``, used only by their Mamba-2 ``ssd_minimal`` for the ``m0`` forward types);
a stub function raises if it is ever called.

One CUDA-only call is bypassed: their ``cross_scan_fn`` / ``cross_merge_fn`` enter
``torch.cuda.device(x.device)``, which current PyTorch refuses for a CPU tensor. The script rebinds the
two names in their ``vmamba`` module to wrappers that call the same torch autograd functions
(``csm_triton.CrossScanF`` / ``CrossMergeF``) with the same arguments, without the device guard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from fixture_io import save_fixture, stub_modules, upstream_commit

REPO = "MzeroMiko/VMamba"
SEED = 0
IMAGE = (1, 3, 32, 48)
NUM_CLASSES = 10
INPUT_STD = 0.1

CONFIGS: dict[str, dict] = {
    "vmamba_v0": dict(
        dims=[16, 24, 32, 48], depths=[1, 1, 2, 1], ssm_d_state=4, ssm_ratio=2.0, ssm_dt_rank="auto",
        ssm_conv=3, ssm_conv_bias=True, forward_type="v0", mlp_ratio=0.0, norm_layer="ln",
        downsample_version="v1", patchembed_version="v1",
    ),
    "vmamba_v2": dict(
        dims=[16, 24, 32, 48], depths=[1, 1, 2, 1], ssm_d_state=1, ssm_ratio=1.0, ssm_dt_rank="auto",
        ssm_conv=3, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0, norm_layer="ln2d",
        downsample_version="v3", patchembed_version="v2",
    ),
}  # fmt: skip


def _not_stubbed_for_use(*args, **kwargs):
    raise RuntimeError("a stubbed import (fvcore / einops) was called: the fixture path must not need it")


def import_vssm(checkout: Path):
    """The authors' ``VSSM`` class, imported from ``<checkout>/classification/models``."""
    models = checkout / "classification" / "models"
    if not (models / "vmamba.py").is_file():
        raise ValueError(
            f"--upstream must be a VMamba checkout with classification/models/vmamba.py, got {checkout}"
        )
    sys.path.insert(0, str(models))
    stubs = {
        "fvcore__nn": {
            name: _not_stubbed_for_use
            for name in ("FlopCountAnalysis", "flop_count_str", "flop_count", "parameter_count")
        },
        "einops": {"rearrange": _not_stubbed_for_use, "repeat": _not_stubbed_for_use},
    }
    with stub_modules("fvcore", "fvcore.nn", "einops", **stubs):
        # The authors' modules, importable only from their checkout.
        import csm_triton
        import vmamba

    def cross_scan_cpu(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, **_):
        return csm_triton.CrossScanF.apply(x, in_channel_first, out_channel_first, one_by_one, scans)

    def cross_merge_cpu(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, **_):
        return csm_triton.CrossMergeF.apply(y, in_channel_first, out_channel_first, one_by_one, scans)

    vmamba.cross_scan_fn, vmamba.cross_merge_fn = cross_scan_cpu, cross_merge_cpu
    return vmamba.VSSM


@torch.no_grad()
def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded noise on every parameter: std 0.1, or 0.05 on the 4-D convolution kernels."""
    for p in model.parameters():
        scale = 0.05 if p.dim() == 4 else 0.1
        p.add_(torch.randn(p.shape, generator=generator) * scale)


def make_fixture(vssm_cls, name: str, commit: str) -> Path:
    config = CONFIGS[name]
    torch.manual_seed(SEED)
    model = vssm_cls(num_classes=NUM_CLASSES, drop_path_rate=0.0, **config).eval()
    generator = torch.Generator().manual_seed(SEED)
    perturb(model, generator)
    # A low-contrast image (std 0.1): the stem's LayerNorm then sees a small variance, where its eps
    # (1e-5 here, not timm's 1e-6) changes the logits well beyond the tests' 1e-5 tolerance.
    x = torch.randn(IMAGE, generator=generator) * INPUT_STD
    with torch.no_grad():
        logits = model(x)
    return save_fixture(
        name,
        state_dict=model.state_dict(),
        inputs={"x": x},
        outputs={"logits": logits},
        upstream_repo=REPO,
        upstream_commit=commit,
        script="tools/upstream/vmamba.py",
        config=dict(config, num_classes=NUM_CLASSES, seed=SEED, image=list(IMAGE), input_std=INPUT_STD),
        notes="VSSM on the CPU: torch CrossScanF/CrossMergeF, selective_scan_torch; fvcore, einops stubbed",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", type=Path, required=True, help="checkout of MzeroMiko/VMamba")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    vssm_cls = import_vssm(args.upstream)
    commit = upstream_commit(args.upstream)
    for name in CONFIGS:
        print(make_fixture(vssm_cls, name, commit))


if __name__ == "__main__":
    main()
