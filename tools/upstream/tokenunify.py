"""Fixture from the TokenUnify authors' own segmenter (ydchen0806/TokenUnify, ``src/segmamba.py``).

Usage::

    git clone /work/.mirror/ydchen0806+TokenUnify/repo /tmp/upstream/TokenUnify   # or any checkout
    pip install --no-deps --target /tmp/upstream/pylib monai einops                # outside the project
    python tools/upstream/tokenunify.py --upstream /tmp/upstream/TokenUnify --pylib /tmp/upstream/pylib

Writes ``tests/vision/fixtures/tokenunify_segmamba.safetensors``: the authors' ``SegMamba`` (their
``MambaEncoder`` under ``vit.`` and MONAI's UNETR blocks ``encoder1-5``, ``decoder5-1``, ``out``) at a
tiny seeded configuration, every parameter perturbed with seeded noise (their initialisation gives
the three routes of a layer the same A_log and D and leaves LayerNorms at 1 / 0, which would hide a
swapped route), their float32 forward on a seeded volume, and

* ``output.logits``: the ``out`` block's output (their ``forward`` returns its sigmoid);
* ``output.skip0`` .. ``skip3``: their encoder's four outputs (``vit(x)``), the decoder's inputs.

The volume is 16 x 80 x 16 (Z, Y, X): every stage's flat length (2560, 320, 40, 5) is divisible by
their fixed ``nslices = 5`` while the stages hold 8, 4, 2 and 1 slices, so the fixture pins the
authors' inter-slice route (5 interleaved chunks), not the real-slice one.

What runs and what is replaced. Their ``Mamba`` (``mamba_local/mamba_ssm_local``, bimamba "v3") runs
its fused path ``mamba_inner_fn_no_out_proj`` as written; that path calls two CUDA extensions, which
are stubbed here with PyTorch functions built from the authors' own references in the same package:
``causal_conv1d_cuda.causal_conv1d_fwd`` -> their ``causal_conv1d_ref`` and
``selective_scan_cuda.fwd`` -> their ``selective_scan_ref`` (returning the output and the output
gated by silu(z), as the kernel does). Stubbed for import only (never called on this path): the
upstream ``mamba_ssm`` package, which their ``mamba_ssm_local/__init__`` pulls in through the language
model ``MambaLMHeadModel``. MONAI and einops are real, installed outside the project (``--pylib``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from fixture_io import save_fixture, stub_modules, upstream_commit

REPO = "ydchen0806/TokenUnify"
SEED = 0
VOLUME = (1, 1, 16, 80, 16)  # (B, C, Z, Y, X)
CONFIG = dict(
    in_chans=1, out_chans=3, depths=[1, 2, 1, 1], feat_size=[8, 12, 16, 20], hidden_size=24,
    kernel_size=(1, 3, 3),
)  # fmt: skip


def _causal_conv1d_fwd(x, weight, bias, *rest):
    """The CUDA extension's forward: (x, weight (D, W), bias, [seq_idx,] silu) -> (B, D, L)."""
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    return causal_conv1d_ref(x, weight, bias, "silu" if rest[-1] else None)


def _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The CUDA extension's forward: (out, scan intermediates, out * silu(z)) from their reference."""
    from mamba_local.mamba_ssm_local.ops.selective_scan_interface import selective_scan_ref

    out = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    out_z = None if z is None else out * F.silu(z.float()).to(out.dtype)
    return out, None, out_z


def _unused(*args, **kwargs):
    raise RuntimeError("a stub for an import-only module was called: the fixture path must not need it")


def import_segmamba(checkout: Path, pylib: Path | None):
    """The authors' ``SegMamba`` class from ``<checkout>/src/segmamba.py``."""
    if not (checkout / "src" / "segmamba.py").is_file():
        raise ValueError(f"--upstream must be a TokenUnify checkout with src/segmamba.py, got {checkout}")
    local = checkout / "mamba_local" / "mamba_ssm_local"
    # Their causal_conv1d package imports itself as the top-level ``causal_conv1d``.
    paths = [str(checkout), str(checkout / "src"), str(local / "causal_conv1d_local")]
    if pylib is not None:
        paths.insert(0, str(pylib))
    sys.path[:0] = paths
    stubs = dict(
        causal_conv1d_cuda={"causal_conv1d_fwd": _causal_conv1d_fwd},
        selective_scan_cuda={"fwd": _selective_scan_fwd},
        mamba_ssm__modules__mamba_simple={"Mamba": _unused, "Block": _unused},
        mamba_ssm__utils__generation={"GenerationMixin": type("GenerationMixin", (), {})},
        mamba_ssm__utils__hf={"load_config_hf": _unused, "load_state_dict_hf": _unused},
    )
    names = [
        "causal_conv1d_cuda", "selective_scan_cuda", "mamba_ssm", "mamba_ssm.modules",
        "mamba_ssm.modules.mamba_simple", "mamba_ssm.utils", "mamba_ssm.utils.generation",
        "mamba_ssm.utils.hf", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.layernorm",
    ]  # fmt: skip
    return names, stubs


@torch.no_grad()
def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded noise on every parameter, so that no two routes or layers share a value."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        scale = 0.3 if leaf.startswith(("A_", "D")) or ".norm." in name else 0.02
        p.add_(scale * torch.randn(p.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", type=Path, required=True, help="a checkout of ydchen0806/TokenUnify")
    parser.add_argument("--pylib", type=Path, default=None, help="where MONAI and einops are installed")
    args = parser.parse_args()
    checkout = args.upstream.resolve()
    names, stubs = import_segmamba(checkout, args.pylib)
    with stub_modules(*names, **stubs):
        from segmamba import SegMamba

        torch.manual_seed(SEED)
        model = SegMamba(**CONFIG).eval()
        generator = torch.Generator().manual_seed(SEED + 1)
        perturb(model, generator)
        x = torch.rand(VOLUME, generator=generator)
        captured = {}
        model.out.register_forward_hook(lambda module, inputs, output: captured.update(logits=output))
        model.vit.register_forward_hook(lambda module, inputs, output: captured.update(skips=output))
        with torch.no_grad():
            affinities = model(x)
    assert torch.equal(affinities, torch.sigmoid(captured["logits"]))
    # Their nslices is a Mamba default (5) that MambaLayer does not override; record what ran.
    nslices = {m.nslices for m in model.modules() if hasattr(m, "nslices")}
    outputs = {"logits": captured["logits"]}
    outputs.update({f"skip{i}": s for i, s in enumerate(captured["skips"])})
    path = save_fixture(
        "tokenunify_segmamba",
        state_dict=model.state_dict(),
        inputs={"x": x},
        outputs=outputs,
        upstream_repo=REPO,
        upstream_commit=upstream_commit(checkout),
        script="tools/upstream/tokenunify.py",
        config=dict(CONFIG, seed=SEED, volume=list(VOLUME), nslices=sorted(nslices)),
        notes=(
            "SegMamba from src/segmamba.py with MONAI's UNETR blocks; their fused Mamba path with the "
            "CUDA extensions replaced by their own causal_conv1d_ref / selective_scan_ref; every "
            "parameter perturbed; logits are the 'out' block's output (forward returns their sigmoid)"
        ),
    )
    size = path.stat().st_size
    logits = tuple(outputs["logits"].shape)
    print(f"wrote {path} ({size / 1e6:.2f} MB), nslices {sorted(nslices)}, logits {logits}")


if __name__ == "__main__":
    main()
