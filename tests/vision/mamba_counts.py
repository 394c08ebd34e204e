"""Parameter counting shared by the Mamba model tests (Vim, VMamba)."""

import math

import timm
import torch


def count(model):
    return sum(p.numel() for p in model.parameters())


def on_meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def mixer_params(dim, K, d_conv=4, grid_conv=0, out_norm=False, d_state=16):
    """Parameters of one Mamba-1 mixer, counted from its definition."""
    E, R, N = 2 * dim, math.ceil(dim / 16), d_state
    conv = E * d_conv**grid_conv + E if grid_conv else K * E * (d_conv + 1)
    per_route = (R + 2 * N) * E + E * R + E + E * N + E  # x_proj, dt_proj (+ bias), A_log, D
    return dim * 2 * E + conv + K * per_route + (2 * E if out_norm else 0) + E * dim
