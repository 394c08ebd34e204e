"""Vim fixtures from the authors' own code: ``tests/vision/fixtures/vim_{patch16,stride8}.safetensors``.

Usage (einops is the one package the authors' code needs that seqvision does not)::

    git clone <hustvl/Vim> /tmp/upstream/Vim
    pip install einops            # or: pip install --target DIR einops; PYTHONPATH=DIR
    python tools/upstream/vim.py --upstream /tmp/upstream/Vim

Builds the authors' ``VisionMamba`` (``vim/models_mamba.py``) at a tiny seeded size with the settings
of their published "midclstok" models (RMSNorm, residual in float32, fused add + norm, bimamba v2,
routes divided by two, absolute positions, the class token in the middle, no RoPE), once with
non-overlapping 16-pixel patches and once with the stride-8 patches of their fine-tuned ("+") models.
Every parameter is moved off its structured initial value, their forward runs in float32 on a seeded
image batch, and the fixture keeps their state dict under their keys, the input and their logits.

What runs in place of the CUDA-only parts (their PyTorch reference functions, nothing of ours):

* stubbed imports: ``selective_scan_cuda`` and ``causal_conv1d_cuda`` (compiled CUDA extensions,
  imported unguarded); ``transformers`` with ``transformers.generation`` / ``transformers.utils`` /
  ``transformers.utils.hub`` (imported by ``mamba_ssm.utils`` for text generation and hub loading,
  never used by Vim; their 2024 names are gone from current releases). A stub holds only the
  names the import statements ask for, each set to None, so any use fails loudly.
* ``mamba_simple.mamba_inner_fn_no_out_proj`` (the fused conv + projections + scan kernel of each
  bimamba-v2 direction) is replaced by the same computation from their own references:
  ``causal_conv1d_ref`` (activation silu), ``x_proj`` / ``dt_proj`` as plain matmuls, and
  ``selective_scan_ref`` with the gate z, returning the gated (B, E, L) output as the kernel does.
  (Their ``use_fast_path=False`` branch cannot serve: it runs the forward direction only.)
* ``rms_norm_fn`` (Triton; used by their ``Block`` for fused add + RMSNorm and for ``norm_f``) is
  replaced by ``rms_norm_ref`` from the same file, with the residual kept in float32 as the kernel
  does when ``residual_in_fp32``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from fixture_io import save_fixture, stub_modules, upstream_commit

UPSTREAM_REPO = "hustvl/Vim"
SEED = 0
BATCH = 2

# The published midclstok models' settings (vim/models_mamba.py, the *_midclstok_div2 functions).
MIDCLSTOK = dict(
    rms_norm=True,
    residual_in_fp32=True,
    fused_add_norm=True,
    final_pool_type="mean",
    if_abs_pos_embed=True,
    if_rope=False,
    if_rope_residual=False,
    bimamba_type="v2",
    if_cls_token=True,
    if_divide_out=True,
    use_middle_cls_token=True,
)

# Tiny sizes: the stride-16 fixture has an even number of patches (4 x 4, class row 8), the stride-8
# one an odd number ((48 - 16) / 8 + 1 = 5 per side, 25 patches, class row 12).
TINY = dict(patch_size=16, embed_dim=48, depth=2, d_state=16, num_classes=10)
FIXTURES = {
    "vim_patch16": dict(img_size=64, stride=16, **TINY),
    "vim_stride8": dict(img_size=48, stride=8, **TINY),
}

TRANSFORMERS_NAMES = {
    "transformers__generation": dict.fromkeys(
        ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput", "TextStreamer")
    ),
    "transformers__utils": dict.fromkeys(("WEIGHTS_NAME", "CONFIG_NAME")),
    "transformers__utils__hub": dict.fromkeys(("cached_file",)),
}


def import_authors_code(upstream: Path):
    """Import their models_mamba with the CUDA-only pieces stubbed; returns (models_mamba, refs)."""
    for folder in ("vim", "mamba-1p1p1", "causal-conv1d"):
        sys.path.insert(0, str(upstream / folder))
    stubs = ("selective_scan_cuda", "causal_conv1d_cuda", "transformers", "transformers.generation",
             "transformers.utils", "transformers.utils.hub")  # fmt: skip
    with stub_modules(*stubs, **TRANSFORMERS_NAMES):
        import models_mamba
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
        from mamba_ssm.modules import mamba_simple
        from mamba_ssm.ops import selective_scan_interface
        from mamba_ssm.ops.triton import layer_norm
    return models_mamba, mamba_simple, layer_norm, selective_scan_interface, causal_conv1d_ref


def install_references(models_mamba, mamba_simple, layer_norm, scan_interface, causal_conv1d_ref) -> None:
    """Point their model at their PyTorch reference functions instead of the CUDA / Triton kernels."""
    selective_scan_ref = scan_interface.selective_scan_ref
    rms_norm_ref = layer_norm.rms_norm_ref

    def inner_no_out_proj_reference(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None, D=None,
        delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True,
    ):  # fmt: skip
        # What MambaInnerFnNoOutProj.forward computes, kernel by kernel: xz (b, 2E, l) -> gated y (b, E, l).
        if B is not None or C is not None or B_proj_bias is not None or C_proj_bias is not None:
            raise NotImplementedError("Vim passes input-dependent B and C without biases")
        rank = delta_proj_weight.shape[1]
        d_state = A.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_ref(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
        x_dbl = torch.nn.functional.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, R + 2N)
        delta = (x_dbl[..., :rank] @ delta_proj_weight.t()).transpose(1, 2)  # (b, E, l)
        B = x_dbl[..., rank : rank + d_state].transpose(1, 2).contiguous()  # (b, N, l)
        C = x_dbl[..., -d_state:].transpose(1, 2).contiguous()
        return selective_scan_ref(
            x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
        )

    def rms_norm_reference(
        x, weight, bias, residual=None, eps=1e-6, dropout_p=0.0, prenorm=False, residual_in_fp32=False,
        **kwargs,
    ):  # fmt: skip
        if dropout_p or kwargs.get("x1") is not None or kwargs.get("rowscale") is not None:
            raise NotImplementedError("Vim's blocks use neither dropout, x1 nor rowscale here")
        out = rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm)
        if not prenorm:
            return out
        out, residual = out
        return out, residual.float() if residual_in_fp32 else residual

    mamba_simple.mamba_inner_fn_no_out_proj = inner_no_out_proj_reference
    models_mamba.rms_norm_fn = rms_norm_reference
    layer_norm.rms_norm_fn = rms_norm_reference


@torch.no_grad()
def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter off its structured start (A = -n, D = 1, unit norms, zero biases, tiny
    positions), so that a conversion that dropped or swapped any tensor would change the logits."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if name.endswith(("A_log", "A_b_log")):
            p.add_(0.3 * noise)  # A stays negative: A = -exp(A_log)
        elif name.endswith("weight") and p.dim() >= 2:
            p.mul_(1 + 0.2 * noise)
        else:  # norms, biases, D, cls_token, pos_embed
            p.add_(0.3 * noise)


def make_fixture(name: str, size: dict, authors, commit: str) -> Path:
    models_mamba = authors[0]
    torch.manual_seed(SEED)
    model = models_mamba.VisionMamba(channels=3, drop_path_rate=0.0, **size, **MIDCLSTOK).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    perturb(model, generator)
    x = torch.randn(BATCH, 3, size["img_size"], size["img_size"], generator=generator)
    with torch.no_grad():
        logits = model(x)
    print(f"{name}: logits {tuple(logits.shape)}, |logits| max {logits.abs().max():.3f}")
    return save_fixture(
        name,
        state_dict=model.state_dict(),
        inputs={"x": x},
        outputs={"logits": logits},
        upstream_repo=UPSTREAM_REPO,
        upstream_commit=commit,
        script="tools/upstream/vim.py",
        config=dict(size, seed=SEED, **MIDCLSTOK),
        notes="float32 CPU forward; fused kernels replaced by causal_conv1d_ref, selective_scan_ref "
        "and rms_norm_ref (see the script's docstring)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help="checkout of hustvl/Vim")
    args = parser.parse_args()
    upstream = args.upstream.resolve()
    if not (upstream / "vim" / "models_mamba.py").is_file():
        raise SystemExit(f"--upstream must be a checkout of {UPSTREAM_REPO}, got {upstream}")
    commit = upstream_commit(upstream)
    authors = import_authors_code(upstream)
    install_references(*authors)
    for name, size in FIXTURES.items():
        print(make_fixture(name, size, authors, commit))


if __name__ == "__main__":
    main()
