"""Test-only: writes caffemodel bytes (a serialised NetParameter) with the protobuf wire format.

Independent of ``seqvision.vision.caffe`` (which reads them): the field numbers are restated here
from lisa-caffe-public's ``src/caffe/proto/caffe.proto``. Each function returns the bytes of one
message or field; a wire-format field is a varint key ``number << 3 | wire_type`` and its value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
import torch

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5

# caffe.proto's V1LayerParameter.LayerType numbers of the layer kinds the tests write.
V1_TYPE_NUMBERS = {
    "Convolution": 4, "Dropout": 6, "InnerProduct": 14, "LRN": 15, "Pooling": 17, "ReLU": 18, "Softmax": 20,
}  # fmt: skip
# Parameter message field numbers: (in LayerParameter, in V1LayerParameter).
PARAM_FIELDS = {
    "convolution_param": (106, 10),
    "inner_product_param": (117, 17),
    "lrn_param": (118, 18),
    "pooling_param": (121, 19),
    "recurrent_param": (134, None),
}


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf writes negative int32/int64 as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def field_varint(number: int, value: int) -> bytes:
    return key(number, VARINT) + varint(int(value))


def field_bytes(number: int, payload: bytes) -> bytes:
    return key(number, BYTES) + varint(len(payload)) + payload


def field_string(number: int, text: str) -> bytes:
    return field_bytes(number, text.encode())


def field_float(number: int, value: float) -> bytes:
    return key(number, FIXED32) + struct.pack("<f", value)


def packed(number: int, values: Iterable[float] | np.ndarray, dtype: str) -> bytes:
    array = values if isinstance(values, np.ndarray) else np.asarray(list(values))
    return field_bytes(number, array.astype(dtype).tobytes())


def unpacked_floats(number: int, values: Iterable[float]) -> bytes:
    return b"".join(field_float(number, v) for v in values)


# ----------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------


def blob_proto(
    tensor: torch.Tensor, *, legacy_shape: bool = False, packed_data: bool = True, double: bool = False
) -> bytes:
    """BlobProto: shape = 7 (BlobShape dim = 1, packed) or the legacy num = 1, channels = 2, height =
    3, width = 4 (leading dims of 1 added up to 4); data = 5 (packed or one field per value) or
    double_data = 8 (packed)."""
    values = tensor.detach().double().flatten().numpy()
    if legacy_shape:
        dims = [1] * (4 - tensor.dim()) + list(tensor.shape)
        shape = b"".join(field_varint(n, d) for n, d in zip((1, 2, 3, 4), dims, strict=True))
    else:
        shape = field_bytes(7, field_bytes(1, b"".join(varint(d) for d in tensor.shape)))
    if double:
        data = packed(8, values, "<f8")
    elif packed_data:
        data = packed(5, values, "<f4")
    else:
        data = unpacked_floats(5, values.tolist())
    return shape + data


def conv_param(num_output: int, kernel_size: int, stride: int = 1, pad: int = 0, group: int = 1) -> bytes:
    """ConvolutionParameter: num_output 1, pad 3, kernel_size 4, group 5, stride 6 (defaults left out,
    as protobuf does)."""
    out = field_varint(1, num_output) + field_varint(4, kernel_size)
    for number, value, default in ((3, pad, 0), (5, group, 1), (6, stride, 1)):
        if value != default:
            out += field_varint(number, value)
    return out


def pooling_param(kernel_size: int = 3, stride: int = 2, pool: int = 0) -> bytes:
    """PoolingParameter: pool 1 (MAX = 0), kernel_size 2, stride 3."""
    return field_varint(1, pool) + field_varint(2, kernel_size) + field_varint(3, stride)


def lrn_param(local_size: int, alpha: float, beta: float, k: float | None = None) -> bytes:
    """LRNParameter: local_size 1, alpha 2, beta 3, k 5 (floats)."""
    out = field_varint(1, local_size) + field_float(2, alpha) + field_float(3, beta)
    return out + (field_float(5, k) if k is not None else b"")


def inner_product_param(num_output: int, axis: int | None = None) -> bytes:
    """InnerProductParameter: num_output 1, axis 5."""
    return field_varint(1, num_output) + (field_varint(5, axis) if axis is not None else b"")


def recurrent_param(num_output: int) -> bytes:
    return field_varint(1, num_output)


def layer_parameter(
    name: str,
    type: str,
    blobs: Sequence[bytes] = (),
    bottom: Sequence[str] = (),
    top: Sequence[str] = (),
    params: dict[str, bytes] | None = None,
    v1: bool = False,
) -> bytes:
    """LayerParameter (name 1, type 2, bottom 3, top 4, blobs 7) or, with ``v1``, V1LayerParameter
    (bottom 2, top 3, name 4, type 5 as its LayerType number, blobs 6). ``blobs``: BlobProto bytes;
    ``params``: parameter name -> message bytes."""
    params = params or {}
    if v1:
        out = b"".join(field_string(2, b) for b in bottom) + b"".join(field_string(3, t) for t in top)
        out += field_string(4, name) + field_varint(5, V1_TYPE_NUMBERS[type])
        out += b"".join(field_bytes(6, blob) for blob in blobs)
    else:
        out = field_string(1, name) + field_string(2, type)
        out += b"".join(field_string(3, b) for b in bottom) + b"".join(field_string(4, t) for t in top)
        out += b"".join(field_bytes(7, blob) for blob in blobs)
    for param, message in params.items():
        number = PARAM_FIELDS[param][1 if v1 else 0]
        out += field_bytes(number, message)
    return out


def net_parameter(layers: Sequence[bytes], name: str = "", v1: bool = False) -> bytes:
    """NetParameter: name 1, then each layer as field 100 (LayerParameter) or 2 (V1 'layers')."""
    out = field_string(1, name) if name else b""
    return out + b"".join(field_bytes(2 if v1 else 100, layer) for layer in layers)
