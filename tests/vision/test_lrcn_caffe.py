"""The LRCN authors' Caffe models: the caffemodel reader, the CaffeNet variant, the conversion.

Caffe cannot run here, so the proof is a tiny caffemodel written from known tensors with the
protobuf wire format (``caffe_writer.py``, field numbers from lisa-caffe-public's caffe.proto):
the real layer kinds (conv1 7x7 / 2 -> ReLU -> ceil-mode max pool 3 / 2 -> LRN across channels,
grouped convolutions, fc6, an LSTM in Caffe's gate order, fc8) at small widths on 83-pixel frames,
loaded through timm / ``LRCN.load_pretrained`` / ``convert_checkpoint`` and compared with a float64
reference written here from Caffe's layer definitions (pooling_layer.cpp, lrn_layer.cpp,
conv_layer with groups, lstm_layer.cpp + lstm_unit_layer.cpp).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from caffe_writer import (
    blob_proto,
    conv_param,
    field_bytes,
    field_string,
    inner_product_param,
    layer_parameter,
    lrn_param,
    net_parameter,
    packed,
    pooling_param,
    recurrent_param,
    varint,
)
from safetensors.torch import save_file
from upstream_fixtures import assert_close_relative

import seqvision  # noqa: F401  (registers the models)
from seqvision.vision.caffe import CaffeModel, is_caffemodel, parse_net_parameter, read_caffemodel
from seqvision.vision.caffenet import UCF101_CLASSES, CaffeNet, feature_grid
from seqvision.vision.lrcn import LRCN
from seqvision.vision.weights import convert_checkpoint

# The tiny CaffeNet variant: the authors' layer kinds and groups, small widths, 83-pixel frames
# (conv1 39 -> pool1 19 -> conv2 8 -> pool2 4 -> pool5 2: both ceil-mode pools clip a window).
WIDTHS = (8, 12, 10, 10, 6)
GROUPS = (1, 2, 1, 2, 2)
KERNELS = ((7, 2, 0), (5, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1))  # kernel, stride, pad
IMG = 83
LRN = dict(local_size=5, alpha=1e-4, beta=0.75, k=1.0)  # the prototxts' norm1 / norm2
HIDDEN, CLASSES, FC6 = 5, 3, 16
TINY_LRCN = dict(num_classes=CLASSES, lstm_hidden=HIDDEN, widths=WIDTHS, fc_dims=(FC6,), img_size=IMG)
TINY_SINGLE = dict(num_classes=CLASSES, widths=WIDTHS, fc_dims=(FC6, 12), img_size=IMG)


# ----------------------------------------------------------------------------------------------
# the tiny net's tensors (Caffe's layouts and gate order) and its caffemodel
# ----------------------------------------------------------------------------------------------


def caffe_tensors(fc_dims=(FC6,), lstm=True, seed=0) -> dict[str, list[torch.Tensor]]:
    """float32 blobs per Caffe layer name. The scales keep the activations where every layer acts:
    conv outputs in the tens (the LRN divides them by 1.05-1.5, as Caffe's 0-255 inputs do in
    the real net), fc6 and the LSTM gates of order 1 (no saturation)."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    chans = (3, *WIDTHS)
    stds = (0.02, 0.08, 0.08, 0.1, 0.1)
    blobs: dict[str, list[torch.Tensor]] = {}
    for i, ((kernel, _, _), group, std) in enumerate(zip(KERNELS, GROUPS, stds, strict=True)):
        weight = normal(chans[i + 1], chans[i] // group, kernel, kernel, std=std)
        blobs[f"conv{i + 1}"] = [weight, normal(chans[i + 1], std=1.0)]
    width = WIDTHS[-1] * feature_grid(IMG) ** 2
    for i, dim in enumerate(fc_dims):
        blobs[f"fc{6 + i}"] = [normal(dim, width, std=0.03 / math.sqrt(width)), normal(dim, std=0.3)]
        width = dim
    if lstm:
        blobs["lstm1"] = [
            normal(4 * HIDDEN, width, std=0.6),  # W_xc, gates [i, f, o, g]
            normal(4 * HIDDEN, std=0.5),  # b_c
            normal(4 * HIDDEN, HIDDEN, std=0.6),  # W_hc
        ]
        blobs["fc8-final"] = [normal(CLASSES, HIDDEN, std=1.0), normal(CLASSES, std=0.5)]
    else:
        blobs["fc8-ucf"] = [normal(CLASSES, width, std=0.5), normal(CLASSES, std=0.5)]
    return blobs


def write_caffemodel(
    path,
    blobs: dict[str, list[torch.Tensor]],
    *,
    v1: bool = False,
    legacy: bool = False,
    packed=True,
    **change,
) -> None:
    """The deploy prototxt's layers in order, with ``blobs``; ``change`` replaces a layer's
    parameter message (e.g. conv1=conv_param(...) with another stride)."""

    def blob_layer(name: str, type: str, param: str | None = None, message: bytes = b"", **kw) -> bytes:
        params = {param: change.get(name, message)} if param else {}
        data = [blob_proto(b, legacy_shape=legacy, packed_data=packed) for b in blobs.get(name, [])]
        return layer_parameter(name, type, data, params=params, v1=v1, **kw)

    layers = []
    bottom = "data"
    for i, ((kernel, stride, pad), group) in enumerate(zip(KERNELS, GROUPS, strict=True)):
        name = f"conv{i + 1}"
        message = conv_param(WIDTHS[i], kernel, stride, pad, group)
        layers.append(
            blob_layer(name, "Convolution", "convolution_param", message, bottom=[bottom], top=[name])
        )
        layers.append(layer_parameter(f"relu{i + 1}", "ReLU", bottom=[name], top=[name], v1=v1))
        bottom = name
        if i in (0, 1, 4):
            pool = f"pool{i + 1}"
            layers.append(blob_layer(pool, "Pooling", "pooling_param", pooling_param(3, 2), bottom=[bottom]))
            bottom = pool
        if i in (0, 1):
            norm = f"norm{i + 1}"
            message = lrn_param(LRN["local_size"], LRN["alpha"], LRN["beta"])
            layers.append(blob_layer(norm, "LRN", "lrn_param", message, bottom=[bottom]))
            bottom = norm
    for name in sorted(n for n in blobs if n.startswith("fc") and n[2:].isdigit()):
        dim = blobs[name][0].shape[0]
        layers.append(blob_layer(name, "InnerProduct", "inner_product_param", inner_product_param(dim)))
        layers.append(layer_parameter(f"relu{name[2:]}", "ReLU", v1=v1))
        layers.append(layer_parameter(f"drop{name[2:]}", "Dropout", v1=v1))
    for name in (n for n in blobs if n.startswith("lstm")):
        layers.append(blob_layer(name, "LSTM", "recurrent_param", recurrent_param(HIDDEN)))
    if "fc8-final" in blobs:
        layers.append(
            blob_layer("fc8-final", "InnerProduct", "inner_product_param", inner_product_param(CLASSES, 2))
        )
    if "fc8-ucf" in blobs:
        layers.append(
            blob_layer("fc8-ucf", "InnerProduct", "inner_product_param", inner_product_param(CLASSES))
        )
    layers.append(layer_parameter("probs", "Softmax", v1=v1))
    path.write_bytes(net_parameter(layers, name="Hyb2Net-LSTM", v1=v1))


# ----------------------------------------------------------------------------------------------
# the float64 reference, from Caffe's layer definitions
# ----------------------------------------------------------------------------------------------


def ref_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, pad: int, group: int):
    """Caffe's grouped convolution as per-group products of im2col columns: group g's outputs read
    only input channels [g * C / group, (g + 1) * C / group)."""
    N, C, H, W = x.shape
    out_c, cin_g, kh, kw = weight.shape
    cols = F.unfold(F.pad(x, (pad,) * 4), (kh, kw), stride=stride)  # (N, C * kh * kw, L), channel-major
    cols = cols.view(N, C, kh * kw, -1)
    out_g = out_c // group
    parts = []
    for g in range(group):
        cols_g = cols[:, g * cin_g : (g + 1) * cin_g].reshape(N, cin_g * kh * kw, -1)
        parts.append(weight[g * out_g : (g + 1) * out_g].reshape(out_g, -1) @ cols_g)
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    return (torch.cat(parts, 1) + bias[:, None]).view(N, out_c, Ho, Wo)


def ref_max_pool(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    """pooling_layer.cpp: output ceil((H - k) / s) + 1; the last window is clipped at the border."""
    H, W = x.shape[-2:]
    Ho, Wo = math.ceil((H - kernel) / stride) + 1, math.ceil((W - kernel) / stride) + 1
    out = x.new_empty(*x.shape[:-2], Ho, Wo)
    for i in range(Ho):
        for j in range(Wo):
            h0, w0 = i * stride, j * stride
            window = x[..., h0 : min(h0 + kernel, H), w0 : min(w0 + kernel, W)]
            out[..., i, j] = window.amax(dim=(-2, -1))
    return out


def ref_lrn(x: torch.Tensor, local_size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """lrn_layer.cpp, ACROSS_CHANNELS: x_c / (k + alpha / n * sum of x^2 over channels c - n//2 ..
    c + n//2 inside the tensor)^beta."""
    C = x.shape[1]
    half = (local_size - 1) // 2
    out = torch.empty_like(x)
    for c in range(C):
        window = x[:, max(0, c - half) : min(C, c + half + 1)]
        out[:, c] = x[:, c] * (k + alpha / local_size * window.pow(2).sum(1)).pow(-beta)
    return out


def ref_fc6(
    frames_bgr: torch.Tensor, blobs: dict[str, list[torch.Tensor]], fc_layers: int = 1
) -> torch.Tensor:
    """The CaffeNet variant up to ReLU(fc{5 + fc_layers}) on Caffe's BGR frames, float64."""
    b = {name: [t.double() for t in ts] for name, ts in blobs.items()}
    x = frames_bgr.double()
    for i, ((_, stride, pad), group) in enumerate(zip(KERNELS, GROUPS, strict=True)):
        x = ref_conv(x, *b[f"conv{i + 1}"], stride, pad, group).clamp_min(0)
        if i in (0, 1, 4):
            x = ref_max_pool(x)
        if i in (0, 1):
            x = ref_lrn(x, **LRN)
    x = x.flatten(1)  # Caffe's InnerProduct reads (C, H, W) in memory order
    for i in range(fc_layers):
        weight, bias = b[f"fc{6 + i}"]
        x = (x @ weight.T + bias).clamp_min(0)
    return x


def ref_caffe_lstm(x, cont, w_xc, b_c, w_hc, h_prev, c_prev):
    """lstm_layer.cpp unrolled, lstm_unit_layer.cpp per step, over x (T, N, D) and the clip markers
    cont (T, N): gates = W_xc x_t + b_c + W_hc (cont_t h_{t-1}) stacked [i, f, o, g];
    c_t = cont_t f c_{t-1} + i g, h_t = o tanh(c_t). h_prev / c_prev: the state Caffe carries in
    from the previous batch (zeroed by cont_0 = 0)."""
    H = w_hc.shape[1]
    h, c, outs = h_prev, c_prev, []
    for t in range(x.shape[0]):
        flush = cont[t][:, None]
        gates = x[t] @ w_xc.T + b_c + (flush * h) @ w_hc.T
        i, f, o, g = (gates[:, k * H : (k + 1) * H] for k in range(4))
        i, f, o, g = torch.sigmoid(i), flush * torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)


def ref_lrcn_step_logits(clips_rgb: torch.Tensor, blobs: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """The Caffe LRCN on clips (B, T, 3, H, W) as Caffe sees them (BGR) -> fc8-final (B, T, classes)."""
    B, T = clips_rgb.shape[:2]
    feats = ref_fc6(clips_rgb.flatten(0, 1).flip(1), blobs).view(B, T, -1).transpose(0, 1)  # (T, B, D)
    cont = torch.ones(T, B, dtype=torch.float64)
    cont[0] = 0  # the clip marker of a clip's first frame (classify_video.py: clip_markers[0:10] = 0)
    g = torch.Generator().manual_seed(7)
    stale = torch.randn(2, B, HIDDEN, generator=g, dtype=torch.float64)  # a previous batch's state
    w_xc, b_c, w_hc = (t.double() for t in blobs["lstm1"])
    h = ref_caffe_lstm(feats, cont, w_xc, b_c, w_hc, stale[0], stale[1])
    weight, bias = (t.double() for t in blobs["fc8-final"])
    return (h @ weight.T + bias).transpose(0, 1)


def clips(B=2, T=3, seed=1) -> torch.Tensor:
    """RGB frames at Caffe's scale (0-255 minus a mean), as timm's normalisation with the cfg gives."""
    return torch.randn(B, T, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)) * 60


@pytest.fixture(scope="module")
def lrcn_file(tmp_path_factory):
    blobs = caffe_tensors()
    path = tmp_path_factory.mktemp("caffe") / "RGB_lstm_tiny.caffemodel"
    write_caffemodel(path, blobs)
    return path, blobs


# ----------------------------------------------------------------------------------------------
# the reader: the wire format round trip, both layer fields, every blob encoding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v1", [False, True])
def test_reader_round_trips_layers_and_blobs_exactly(tmp_path, v1):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, generator=g)
    matrix = torch.randn(5, 7, generator=g)
    encodings = [
        dict(),
        dict(legacy_shape=True),
        dict(packed_data=False),
        dict(legacy_shape=True, packed_data=False),
        dict(double=True),
    ]
    layers = [
        layer_parameter(
            f"conv{i}",
            "Convolution",
            [blob_proto(weight, **enc), blob_proto(bias, **enc)],
            bottom=["data"],
            top=[f"conv{i}"],
            params={"convolution_param": conv_param(4, 3, stride=2, pad=1, group=2)},
            v1=v1,
        )
        for i, enc in enumerate(encodings)
    ]
    layers.append(layer_parameter("relu", "ReLU", bottom=["conv0"], top=["conv0"], v1=v1))
    layers.append(layer_parameter("pool", "Pooling", params={"pooling_param": pooling_param(3, 2)}, v1=v1))
    layers.append(
        layer_parameter("norm", "LRN", params={"lrn_param": lrn_param(5, 1e-4, 0.75, k=2.0)}, v1=v1)
    )
    layers.append(
        layer_parameter("fc", "InnerProduct", [blob_proto(matrix, legacy_shape=True)], v1=v1, params={})
    )
    path = tmp_path / ("v1.caffemodel" if v1 else "net.caffemodel")
    path.write_bytes(net_parameter(layers, name="tiny", v1=v1))

    net = read_caffemodel(path)
    assert isinstance(net, CaffeModel) and net.name == "tiny" and net.format == ("layers" if v1 else "layer")
    assert list(net) == [f"conv{i}" for i in range(len(encodings))] + ["relu", "pool", "norm", "fc"]
    for i, enc in enumerate(encodings):
        layer = net[f"conv{i}"]
        assert layer.type == "Convolution" and layer.bottom == ["data"] and layer.top == [f"conv{i}"]
        # the legacy shape is 4-D: (1, 1, 1, 4) for the bias
        expected_bias = bias.view(1, 1, 1, 4) if enc.get("legacy_shape") else bias
        assert torch.equal(layer.blobs[0], weight) and torch.equal(layer.blobs[1], expected_bias)
        assert layer.blobs[0].dtype == torch.float32
        assert layer.params == {
            "convolution_param": dict(num_output=4, kernel_size=3, stride=2, pad=1, group=2)
        }
    assert net["relu"].type == "ReLU" and net["relu"].blobs == []
    assert net["pool"].params == {"pooling_param": dict(pool=0, kernel_size=3, stride=2)}
    lrn = net["norm"].params["lrn_param"]
    assert lrn["local_size"] == 5 and lrn["beta"] == 0.75 and lrn["k"] == 2.0
    assert lrn["alpha"] == pytest.approx(1e-4, rel=1e-7)
    assert torch.equal(net["fc"].blobs[0], matrix.view(1, 1, 5, 7))


def test_reader_reads_a_layer_repeated_per_phase_once():
    # train_test prototxts repeat names for per-phase layers without weights ('reshape-data')
    w = blob_proto(torch.ones(2, 2))
    data = net_parameter(
        [
            layer_parameter("reshape-data", "Reshape"),
            layer_parameter("reshape-data", "Reshape"),
            layer_parameter("fc", "InnerProduct", [w]),
        ]
    )
    assert list(parse_net_parameter(data)) == ["reshape-data", "fc"]
    twice = net_parameter(
        [layer_parameter("fc", "InnerProduct", [w]), layer_parameter("fc", "InnerProduct", [w])]
    )
    with pytest.raises(ValueError, match="two layers named 'fc' both hold weights"):
        parse_net_parameter(twice)


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path, lrcn_file):
    path, _ = lrcn_file
    data = path.read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\.caffemodel.*truncated.*at byte offset \d+"):
        read_caffemodel(cut)
    with pytest.raises(ValueError, match=r"wire type 7.*at byte offset 0"):
        parse_net_parameter(b"\x0f" + data[1:], source="bad")
    with pytest.raises(ValueError, match="empty"):
        parse_net_parameter(b"")
    with pytest.raises(ValueError, match=r"wire type 6.*not a caffemodel"):
        parse_net_parameter(b"name: 'a prototxt, not weights'\n")
    with pytest.raises(ValueError, match=r"no layers found.*not a caffemodel"):
        parse_net_parameter(field_string(1, "only a name"))
    with pytest.raises(TypeError, match="bytes"):
        parse_net_parameter("text")
    # a blob whose shape and data disagree: shape (2, 3), five floats
    bad_blob = field_bytes(7, field_bytes(1, varint(2) + varint(3))) + packed(5, [1.0] * 5, "<f4")
    with pytest.raises(ValueError, match=r"'fc' blobs\[0\] has shape \(2, 3\) \(6 values\) but holds 5"):
        parse_net_parameter(net_parameter([layer_parameter("fc", "InnerProduct", [bad_blob])]))
    with pytest.raises(ValueError, match="no shape"):
        parse_net_parameter(
            net_parameter([layer_parameter("fc", "InnerProduct", [b"\x2a\x04\x00\x00\x80\x3f"])])
        )
    with pytest.raises(FileNotFoundError):
        read_caffemodel(tmp_path / "missing.caffemodel")


def test_caffemodels_are_told_from_torch_files(tmp_path, lrcn_file):
    path, _ = lrcn_file
    snapshot = tmp_path / "caffe_imagenet_iter_310000"  # Caffe's snapshots may have no suffix
    snapshot.write_bytes(path.read_bytes())
    torch.save({"a": torch.ones(1)}, tmp_path / "state")
    save_file({"a": torch.ones(1)}, str(tmp_path / "state.safetensors"))
    assert is_caffemodel(path) and is_caffemodel(snapshot)
    assert not is_caffemodel(tmp_path / "state") and not is_caffemodel(tmp_path / "state.safetensors")


# ----------------------------------------------------------------------------------------------
# the conversion, proven against the float64 reference
# ----------------------------------------------------------------------------------------------


def test_reference_layers_agree_with_torch_where_torch_has_them():
    # the reference's pooling and LRN are Caffe's definitions; PyTorch's ceil-mode pool and LRN agree
    x = torch.randn(2, 7, 8, 9, dtype=torch.float64) * 30
    assert torch.equal(ref_max_pool(x), F.max_pool2d(x, 3, 2, ceil_mode=True))
    assert ref_max_pool(x).shape[-2:] == (4, 4)  # floor mode would give (3, 4)
    torch.testing.assert_close(ref_lrn(x, 5, 1e-3, 0.75, 2.0), F.local_response_norm(x, 5, 1e-3, 0.75, 2.0))


def tiny_lrcn_from_file(path) -> LRCN:
    overlay = dict(file=str(path), custom_load=True)
    return timm.create_model(
        "lrcn_caffenet", pretrained=True, pretrained_cfg_overlay=overlay, **TINY_LRCN
    ).eval()


def test_tiny_lrcn_caffemodel_matches_the_float64_reference(lrcn_file):
    path, blobs = lrcn_file
    model = tiny_lrcn_from_file(path)
    x = clips()
    expected = ref_lrcn_step_logits(x, blobs)
    with torch.no_grad():
        step_logits = model.forward_step_logits(x)
        logits = model(x)
    assert_close_relative(step_logits.double(), expected)
    assert_close_relative(logits.double(), expected.mean(1))
    # the check has teeth: PyTorch's gate order read as Caffe's, or BGR frames, give other outputs
    wrong = {**blobs, "lstm1": [t.clone() for t in blobs["lstm1"]]}
    for t in wrong["lstm1"]:
        t[2 * HIDDEN :] = t[2 * HIDDEN :].roll(HIDDEN, dims=0)  # swap o and g
    assert (ref_lrcn_step_logits(x, wrong) - expected).abs().max() > 1e-2
    with torch.no_grad():
        assert (model.forward_step_logits(x.flip(2)).double() - expected).abs().max() > 1e-2


def test_the_lrn_and_ceil_pooling_matter_in_the_tiny_net(lrcn_file):
    _, blobs = lrcn_file
    b = {name: [t.double() for t in ts] for name, ts in blobs.items()}
    x = clips(B=1, T=1)[0].double()
    conv1 = ref_conv(x, *b["conv1"], 2, 0, 1).clamp_min(0)
    pooled = ref_max_pool(conv1)
    shrink = (pooled - ref_lrn(pooled, **LRN)).abs().max() / pooled.max()
    assert shrink > 0.03  # the LRN scales the strongest responses down noticeably
    assert feature_grid(IMG) == 2 and pooled.shape[-1] == 19


def test_load_pretrained_and_convert_checkpoint_give_the_same_model(lrcn_file):
    path, _ = lrcn_file
    through_timm = tiny_lrcn_from_file(path)
    direct = timm.create_model("lrcn_caffenet", **TINY_LRCN)
    direct.load_pretrained(path)
    converted, state = convert_checkpoint(path, "lrcn_caffenet", **TINY_LRCN)
    assert isinstance(converted, LRCN) and not converted.training
    reference = through_timm.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value) and torch.equal(direct.state_dict()[key], value), key
    assert torch.equal(state["lstm.bias_hh_l0"], torch.zeros(4 * HIDDEN))


def test_the_lstm_conversion_reorders_caffes_gates(lrcn_file):
    path, blobs = lrcn_file
    _, state = convert_checkpoint(path, "lrcn_caffenet", **TINY_LRCN)
    w_xc, b_c, w_hc = blobs["lstm1"]
    i, f, o, g = w_xc.split(HIDDEN)
    assert torch.equal(state["lstm.weight_ih_l0"], torch.cat([i, f, g, o]))
    i, f, o, g = w_hc.split(HIDDEN)
    assert torch.equal(state["lstm.weight_hh_l0"], torch.cat([i, f, g, o]))
    i, f, o, g = b_c.split(HIDDEN)
    assert torch.equal(state["lstm.bias_ih_l0"], torch.cat([i, f, g, o]))
    assert torch.equal(state["encoder.conv1.weight"], blobs["conv1"][0].flip(1))  # BGR -> RGB
    assert torch.equal(state["encoder.conv2.weight"], blobs["conv2"][0])


def test_single_frame_model_in_both_layer_formats_matches_the_reference(tmp_path):
    blobs = caffe_tensors(fc_dims=(FC6, 12), lstm=False, seed=3)
    current, v1 = tmp_path / "single.caffemodel", tmp_path / "single_v1.caffemodel"
    write_caffemodel(current, blobs)
    # V1 'layers', legacy 4-D blob shapes, one field per float: the same weights
    write_caffemodel(v1, blobs, v1=True, legacy=True, packed=False)
    frames = clips(B=3, T=1)[:, 0]
    fc7 = ref_fc6(frames.flip(1), blobs, fc_layers=2)
    weight, bias = (t.double() for t in blobs["fc8-ucf"])
    expected = fc7 @ weight.T + bias
    for path in (current, v1):
        overlay = dict(file=str(path), custom_load=True)
        model = timm.create_model(
            "lrcn_caffenet_singleframe", pretrained=True, pretrained_cfg_overlay=overlay, **TINY_SINGLE
        ).eval()
        with torch.no_grad():
            assert_close_relative(model(frames).double(), expected)
            # a clip: the mean of its frames' logits
            clip = torch.stack([frames, frames.flip(0)], 1)
            assert_close_relative(model(clip).double(), (expected + expected.flip(0)) / 2)
    _, state = convert_checkpoint(v1, "lrcn_caffenet_singleframe", **TINY_SINGLE)
    assert torch.equal(state["head.weight"], blobs["fc8-ucf"][0])


def test_seqvision_files_still_load_through_the_filter(tmp_path, lrcn_file):
    path, _ = lrcn_file
    source = tiny_lrcn_from_file(path)
    saved = tmp_path / "lrcn_caffenet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(saved))
    wrapped = tmp_path / "lrcn_caffenet.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, wrapped)
    x = clips()
    for file in (saved, wrapped):
        # timm's local-file path (LRCN.load_pretrained reads it), and load_pretrained directly
        model = timm.create_model(
            "lrcn_caffenet",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(file), num_classes=CLASSES),  # timm keeps a same-size head
            **TINY_LRCN,
        ).eval()
        other = timm.create_model("lrcn_caffenet", **TINY_LRCN).eval()
        other.load_pretrained(file)
        with torch.no_grad():
            assert torch.equal(model(x), source(x)) and torch.equal(other(x), source(x))
        _, state = convert_checkpoint(file, "lrcn_caffenet", **TINY_LRCN)
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())


def test_another_head_size_keeps_its_init_and_other_channels_adapt_conv1(lrcn_file):
    path, _ = lrcn_file
    overlay = dict(file=str(path), custom_load=True)
    source = tiny_lrcn_from_file(path)
    model = timm.create_model(
        "lrcn_caffenet", pretrained=True, pretrained_cfg_overlay=overlay, **{**TINY_LRCN, "num_classes": 7}
    )
    assert model.head.out_features == 7
    assert torch.equal(model.lstm.weight_ih_l0, source.lstm.weight_ih_l0)
    gray = timm.create_model(
        "lrcn_caffenet", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, **TINY_LRCN
    )
    assert torch.allclose(gray.encoder.conv1.weight, source.encoder.conv1.weight.sum(1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# files that do not fit
# ----------------------------------------------------------------------------------------------


def test_a_reshaped_or_renamed_blob_is_an_error_naming_the_key(tmp_path):
    blobs = caffe_tensors()
    blobs["fc6"][0] = blobs["fc6"][0][:, :-1]  # fc6 for another pool5 map
    reshaped = tmp_path / "reshaped.caffemodel"
    write_caffemodel(reshaped, blobs)
    with pytest.raises(ValueError, match=r"'encoder\.fc6\.weight' \(file \(16, 23\) vs model \(16, 24\)\)"):
        convert_checkpoint(reshaped, "lrcn_caffenet", **TINY_LRCN)
    with pytest.raises(ValueError, match=r"encoder\.fc6\.weight"):
        tiny_lrcn_from_file(reshaped)
    wide = tmp_path / "wide_lstm.caffemodel"  # an LSTM of 5 + 1 units: its 24 gate rows reorder as 4 x 6
    blobs = caffe_tensors()
    blobs["lstm1"] = [torch.randn(24, FC6), torch.randn(24), torch.randn(24, 6)]
    write_caffemodel(wide, blobs)
    with pytest.raises(
        ValueError,
        match=r"'lstm\.bias_hh_l0' \(file \(24,\) vs model \(20,\)\).*weight_hh_l0 \(24, 6\) vs \(20, 5\)",
    ):
        convert_checkpoint(wide, "lrcn_caffenet", **TINY_LRCN)
    blobs["lstm1"] = blobs["lstm1"][:2]
    write_caffemodel(wide, blobs)
    with pytest.raises(ValueError, match=r"layer 'lstm1': a Caffe LSTM layer holds 3 blobs"):
        convert_checkpoint(wide, "lrcn_caffenet", **TINY_LRCN)
    blobs = caffe_tensors()
    blobs["lstm2"] = blobs.pop("lstm1")
    renamed = tmp_path / "renamed.caffemodel"
    write_caffemodel(renamed, blobs)
    with pytest.raises(
        ValueError, match=r"first key that does not fit: '<caffe layer lstm2 blob 0>' \(the file has it"
    ):
        convert_checkpoint(renamed, "lrcn_caffenet", **TINY_LRCN)


def test_a_file_of_another_geometry_is_refused(tmp_path):
    path = tmp_path / "stride4.caffemodel"
    write_caffemodel(path, caffe_tensors(), conv1=conv_param(WIDTHS[0], 7, stride=4))
    with pytest.raises(ValueError, match=r"layer 'conv1' has convolution_param\.stride = 4.*computes with 2"):
        convert_checkpoint(path, "lrcn_caffenet", **TINY_LRCN)
    path = tmp_path / "lrn.caffemodel"
    write_caffemodel(path, caffe_tensors(), norm2=lrn_param(3, 1e-4, 0.75))
    with pytest.raises(ValueError, match=r"layer 'norm2' has lrn_param\.local_size = 3"):
        convert_checkpoint(path, "lrcn_caffenet", **TINY_LRCN)


def test_a_caffemodel_needs_the_caffenet_encoder(lrcn_file):
    path, _ = lrcn_file
    model = timm.create_model("lrcn_resnet18", num_classes=CLASSES, lstm_hidden=HIDDEN)
    with pytest.raises(ValueError, match=r"encoder is the authors' CaffeNet variant.*ResNet"):
        model.load_pretrained(path)


# ----------------------------------------------------------------------------------------------
# the registered models and their tags
# ----------------------------------------------------------------------------------------------

TAGS = {
    "lrcn_caffenet.ucf101_split1_rgb": ("RGB_lstm_model_iter_30000.caffemodel", "rgb"),
    "lrcn_caffenet.ucf101_split1_flow": ("flow_lstm_model_iter_50000.caffemodel", "flow"),
    "lrcn_caffenet_singleframe.ucf101_split1_rgb": (
        "single_frame_all_layers_hyb_RGB_iter_5000.caffemodel",
        "rgb",
    ),
    "lrcn_caffenet_singleframe.ucf101_split1_flow": (
        "single_frame_all_layers_hyb_flow_iter_50000.caffemodel",
        "flow",
    ),
}


def test_every_published_file_is_a_pretrained_tag():
    assert set(timm.list_pretrained("lrcn_*")) == set(TAGS)
    for tag, (file, kind) in TAGS.items():
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert cfg["url"] == "https://people.eecs.berkeley.edu/~lisa_anne/" + file
        assert cfg["custom_load"] is True and cfg["num_classes"] == 101 and cfg["license"] == "bsd-2-clause"
        assert cfg["input_size"] == (3, 227, 227) and cfg["fixed_input_size"] is True
        assert cfg["crop_pct"] == 227 / 240 and cfg["interpolation"] == "bilinear"
        assert cfg["std"] == (1 / 255,) * 3
        mean = (128, 128, 128) if kind == "flow" else (128.68, 116.779, 103.939)  # RGB order
        assert cfg["mean"] == tuple(m / 255 for m in mean)
        assert cfg["label_names"] == UCF101_CLASSES and len(UCF101_CLASSES) == 101
        assert cfg["first_conv"] == ("encoder.conv1" if tag.startswith("lrcn_caffenet.") else "conv1")
        if tag.startswith("lrcn_caffenet."):
            assert cfg["num_frames"] == 16


def test_full_size_models_have_the_prototxts_shapes():
    with torch.device("meta"):
        lrcn = timm.create_model("lrcn_caffenet")
        single = timm.create_model("lrcn_caffenet_singleframe")
    shapes = {k: tuple(v.shape) for k, v in lrcn.state_dict().items()}
    assert shapes == {
        "encoder.conv1.weight": (96, 3, 7, 7), "encoder.conv1.bias": (96,),
        "encoder.conv2.weight": (384, 48, 5, 5), "encoder.conv2.bias": (384,),
        "encoder.conv3.weight": (512, 384, 3, 3), "encoder.conv3.bias": (512,),
        "encoder.conv4.weight": (512, 256, 3, 3), "encoder.conv4.bias": (512,),
        "encoder.conv5.weight": (384, 256, 3, 3), "encoder.conv5.bias": (384,),
        "encoder.fc6.weight": (4096, 384 * 6 * 6), "encoder.fc6.bias": (4096,),
        "lstm.weight_ih_l0": (1024, 4096), "lstm.weight_hh_l0": (1024, 256),
        "lstm.bias_ih_l0": (1024,), "lstm.bias_hh_l0": (1024,),
        "head.weight": (101, 256), "head.bias": (101,),
    }  # fmt: skip
    assert isinstance(lrcn.encoder, CaffeNet) and lrcn.encoder.img_size == (227, 227)
    assert lrcn.feature_drop.p == 0.9 and lrcn.head_drop.p == 0.5 and lrcn.encoder.drop_rate == 0.0
    assert single.fc7.weight.shape == (4096, 4096) and single.head.weight.shape == (101, 4096)
    assert single.fc_drop.p == single.head_drop.p == 0.5
    assert [feature_grid(s) for s in (224, 227, 240)] == [6, 6, 6]


def test_caffenet_timm_contract():
    model = timm.create_model(
        "caffenet_hybrid", num_classes=4, **{k: TINY_SINGLE[k] for k in ("widths", "fc_dims", "img_size")}
    )
    model.eval()
    x = torch.randn(2, 3, IMG, IMG)
    assert model(x).shape == (2, 4) and model.forward_features(x).shape == (2, WIDTHS[-1], 2, 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 12)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == list(WIDTHS) and torch.equal(final, model.forward_features(x))
    features = timm.create_model(
        "caffenet_hybrid", features_only=True, out_indices=(1, 4), widths=WIDTHS, fc_dims=(FC6,), img_size=IMG
    )
    assert [t.shape[1:] for t in features(x)] == [(12, 8, 8), (6, 4, 4)]
    model.reset_classifier(0)
    assert model(x).shape == (2, 12)
    model.set_grad_checkpointing()
    model.train()
    model(x).sum().backward()
    assert model.conv1.weight.grad is not None
    with pytest.raises(ValueError, match=r"pool5 map as img_size=\(83, 83\)"):
        model(torch.randn(1, 3, 120, 120))
    model.reset_classifier(0, "")  # timm's unpooled features: the pool5 map itself
    assert torch.equal(model.forward_head(model.forward_features(x)), model.forward_features(x))
    with pytest.raises(ValueError, match="takes no classifier"):
        model.reset_classifier(3)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(3, "avg")
    # dynamic_img_size: other sizes pool the map to fc6's grid; the cfg's size is unchanged
    dynamic = CaffeNet(dynamic_img_size=True, **TINY_SINGLE).eval()
    dynamic.load_state_dict(timm.create_model("caffenet_hybrid", **TINY_SINGLE).state_dict())
    fixed = CaffeNet(**TINY_SINGLE).eval()
    fixed.load_state_dict(dynamic.state_dict())
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x)) and dynamic(torch.randn(1, 3, 120, 97)).shape == (1, CLASSES)
    with pytest.raises(ValueError, match="at least 65 x 65"):
        dynamic(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="img_size must be at least"):
        CaffeNet(img_size=40)
    with pytest.raises(ValueError, match="conv2 has 2 groups"):
        CaffeNet(widths=(7, 12, 10, 10, 6), img_size=IMG)
