"""Caffe's ``.caffemodel`` files, read from the protobuf wire format (no Caffe or protobuf install).

A ``.caffemodel`` is one serialised ``NetParameter`` message (``src/caffe/proto/caffe.proto``; the
field numbers below are those of LisaAnne/lisa-caffe-public, the Caffe fork the LRCN models were
trained with). What a weight conversion needs of it:

    NetParameter    name = 1 (string), layer = 100 (LayerParameter), layers = 2 (V1LayerParameter)
    LayerParameter  name = 1, type = 2 (string), bottom = 3, top = 4, blobs = 7 (BlobProto);
                    convolution_param = 106, inner_product_param = 117, lrn_param = 118,
                    pooling_param = 121, recurrent_param = 134
    V1LayerParameter  bottom = 2, top = 3, name = 4, type = 5 (enum LayerType), blobs = 6;
                    convolution_param = 10, inner_product_param = 17, lrn_param = 18,
                    pooling_param = 19; layer = 1 (a V0LayerParameter: name = 1, type = 2, blobs = 50)
    BlobProto       shape = 7 (BlobShape: dim = 1, packed int64), data = 5 (packed float),
                    num = 1, channels = 2, height = 3, width = 4 (the legacy 4-D shape);
                    double_data = 8 (packed double) is BVLC Caffe's later addition, read as well

The wire format: every field is a varint key ``field_number << 3 | wire_type`` followed by its
value: wire type 0 a varint, 1 eight bytes, 2 a varint length and that many bytes (strings,
sub-messages, packed repeated numbers), 5 four bytes. Numbers are little-endian. Unknown fields
are skipped, so files written by other Caffe versions read as long as these fields mean the same.

:func:`read_caffemodel` returns a :class:`CaffeModel`: the layers by name, in file order, each a
:class:`CaffeLayer` with its blobs as float32 tensors (shape from ``shape``, else the legacy
num/channels/height/width) and the decoded geometry parameters of convolution, pooling, LRN,
inner-product and recurrent layers. A truncated or corrupt file is a ValueError naming the file,
the message and field, and the byte offset.

For timm's ``custom_load`` path: :func:`read_weights` reads a caffemodel or, for any other file,
``weights.read_checkpoint``; ``weights.load_pretrained_file(model, path, filter_fn, read_weights)``
converts and loads it as timm's loader would.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .weights import read_checkpoint

__all__ = [
    "CaffeLayer",
    "CaffeModel",
    "is_caffemodel",
    "parse_net_parameter",
    "read_caffemodel",
    "read_weights",
]

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5

# V1LayerParameter.LayerType (caffe.proto) -> the type string of the newer LayerParameter.
V1_LAYER_TYPES = {
    0: "None", 35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat",
    37: "ContrastiveLoss", 4: "Convolution", 5: "Data", 39: "Deconvolution", 6: "Dropout",
    32: "DummyData", 7: "EuclideanLoss", 25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data",
    10: "HDF5Output", 28: "HingeLoss", 11: "Im2col", 12: "ImageData", 13: "InfogainLoss",
    14: "InnerProduct", 15: "LRN", 29: "MemoryData", 16: "MultinomialLogisticLoss", 34: "MVN",
    17: "Pooling", 26: "Power", 18: "ReLU", 19: "Sigmoid", 27: "SigmoidCrossEntropyLoss",
    36: "Silence", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 33: "Slice", 23: "TanH",
    24: "WindowData", 31: "Threshold",
}  # fmt: skip

# The parameter messages read, per layer kind: field number -> (name, kind). Kinds: 'uint' and
# 'int' varints, 'bool', 'enum' (kept as its number), 'float' (32-bit).
_CONVOLUTION = {
    1: ("num_output", "uint"), 2: ("bias_term", "bool"), 3: ("pad", "uint"), 4: ("kernel_size", "uint"),
    5: ("group", "uint"), 6: ("stride", "uint"), 9: ("pad_h", "uint"), 10: ("pad_w", "uint"),
    11: ("kernel_h", "uint"), 12: ("kernel_w", "uint"), 13: ("stride_h", "uint"), 14: ("stride_w", "uint"),
}  # fmt: skip
_POOLING = {
    1: ("pool", "enum"), 2: ("kernel_size", "uint"), 3: ("stride", "uint"), 4: ("pad", "uint"),
    5: ("kernel_h", "uint"), 6: ("kernel_w", "uint"), 7: ("stride_h", "uint"), 8: ("stride_w", "uint"),
    9: ("pad_h", "uint"), 10: ("pad_w", "uint"), 12: ("global_pooling", "bool"),
}  # fmt: skip
_LRN = {1: ("local_size", "uint"), 2: ("alpha", "float"), 3: ("beta", "float"), 4: ("norm_region", "enum"),
        5: ("k", "float")}  # fmt: skip
_INNER_PRODUCT = {1: ("num_output", "uint"), 2: ("bias_term", "bool"), 5: ("axis", "int")}
_RECURRENT = {1: ("num_output", "uint")}

# field number -> (parameter name, schema), in LayerParameter and in V1LayerParameter.
_LAYER_PARAMS = {
    106: ("convolution_param", _CONVOLUTION), 117: ("inner_product_param", _INNER_PRODUCT),
    118: ("lrn_param", _LRN), 121: ("pooling_param", _POOLING), 134: ("recurrent_param", _RECURRENT),
}  # fmt: skip
_V1_LAYER_PARAMS = {
    10: ("convolution_param", _CONVOLUTION), 17: ("inner_product_param", _INNER_PRODUCT),
    18: ("lrn_param", _LRN), 19: ("pooling_param", _POOLING),
}  # fmt: skip


@dataclass
class CaffeLayer:
    """One layer of a caffemodel.

    ``blobs``: its learned tensors in Caffe's order (float32), e.g. [weight (out, in/group, kh, kw),
    bias (out,)] for a convolution, [W_xc (4H, D), b_c (4H,), W_hc (4H, H)] for an LSTM.
    ``params``: the decoded ``*_param`` messages present in the file (parameter name -> field name
    -> value; a field given several times, as BVLC's repeated ``kernel_size``, keeps the last).
    """

    name: str
    type: str
    bottom: list[str] = field(default_factory=list)
    top: list[str] = field(default_factory=list)
    blobs: list[torch.Tensor] = field(default_factory=list)
    params: dict[str, dict[str, int | float | bool]] = field(default_factory=dict)


class CaffeModel(dict[str, CaffeLayer]):
    """The layers of a caffemodel by name, in file order (a dict of :class:`CaffeLayer`).

    ``name``: the net's name; ``source``: where it was read from; ``format``: 'layer' (the current
    LayerParameter field) or 'layers' (the V1 field).
    """

    def __init__(self, name: str = "", source: str = "", format: str = "layer") -> None:
        super().__init__()
        self.name = name
        self.source = source
        self.format = format

    def __repr__(self) -> str:
        with_blobs = sum(bool(layer.blobs) for layer in self.values())
        return f"CaffeModel({self.name!r}, {len(self)} layers, {with_blobs} with blobs)"


class _Parser:
    """Walks the fields of protobuf messages in one buffer; every error names the byte offset."""

    def __init__(self, data: bytes | bytearray | memoryview, source: str) -> None:
        self.buf = memoryview(data).cast("B")
        self.source = source

    def fail(self, message: str, offset: int) -> ValueError:
        return ValueError(f"{self.source}: {message} (at byte offset {offset})")

    def varint(self, pos: int, end: int, what: str) -> tuple[int, int]:
        value = shift = 0
        start = pos
        while True:
            if pos >= end:
                raise self.fail(f"{what}: the varint is cut off (the file is truncated or corrupt)", start)
            byte = self.buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7
            if shift >= 70:
                raise self.fail(f"{what}: a varint longer than 10 bytes (the file is corrupt)", start)

    def field(self, pos: int, end: int, message: str) -> tuple[int, int, int, int, int]:
        """The field whose key starts at ``pos``: (field number, wire type, value start, value end,
        next position). For a varint the 'value start' is the value itself."""
        offset = pos
        key, pos = self.varint(pos, end, f"{message}: a field key")
        number, wire = key >> 3, key & 7
        if number == 0:
            raise self.fail(f"{message}: field number 0 in key {key} (the file is corrupt)", offset)
        what = f"{message} field {number}"
        if wire == _VARINT:
            value, pos = self.varint(pos, end, what)
            return number, wire, value, pos, pos
        if wire == _BYTES:
            size, pos = self.varint(pos, end, f"{what} length")
        elif wire == _FIXED64:
            size = 8
        elif wire == _FIXED32:
            size = 4
        else:
            raise self.fail(
                f"{what} has wire type {wire}, which caffe.proto never uses (the file is corrupt or not a "
                "caffemodel)",
                offset,
            )
        if pos + size > end:
            raise self.fail(
                f"{what} (wire type {wire}) needs {size} bytes but only {end - pos} remain in its message "
                "(the file is truncated or corrupt)",
                offset,
            )
        return number, wire, pos, pos + size, pos + size

    def fields(self, start: int, end: int, message: str) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value start, value end) for each field of the message in
        ``buf[start:end]``."""
        pos = start
        while pos < end:
            number, wire, a, b, pos = self.field(pos, end, message)
            yield number, wire, a, b

    # --------------------------------------------------------------------------------------
    # scalars and packed numbers
    # --------------------------------------------------------------------------------------

    def text(self, start: int, end: int) -> str:
        return bytes(self.buf[start:end]).decode("utf-8", errors="replace")

    def scalar(self, kind: str, wire: int, start: int, end: int, what: str) -> int | float | bool:
        if kind == "float":
            if wire != _FIXED32:
                raise self.fail(f"{what} must be a 32-bit float (wire type 5), got wire type {wire}", start)
            return struct.unpack_from("<f", self.buf, start)[0]
        if wire != _VARINT:
            raise self.fail(f"{what} must be a varint (wire type 0), got wire type {wire}", start)
        if kind == "bool":
            return bool(start)
        if kind == "int" and start >= 1 << 63:  # int32/int64 negatives are 10-byte two's complement
            return start - (1 << 64)
        return start

    def packed_varints(self, start: int, end: int, what: str) -> list[int]:
        values, pos = [], start
        while pos < end:
            value, pos = self.varint(pos, end, what)
            values.append(value)
        return values

    def numbers(self, start: int, end: int, dtype: str, what: str) -> np.ndarray:
        """Packed little-endian floats ('<f4') or doubles ('<f8') in ``buf[start:end]``."""
        width = np.dtype(dtype).itemsize
        if (end - start) % width:
            raise self.fail(
                f"{what}: {end - start} bytes of packed {dtype[1:]} values is not a multiple of {width} "
                "(the file is corrupt)",
                start,
            )
        return np.frombuffer(self.buf, dtype=dtype, count=(end - start) // width, offset=start)

    def unpacked_run(self, key_start: int, end: int, width: int, dtype: str) -> tuple[np.ndarray, int]:
        """A run of one-value fields with the same key byte (key, value, key, value, ...), as
        protobuf writes a repeated number without packing; returns the values and where the run
        ends. Read in one step rather than a field at a time, as weights hold millions of them."""
        stride = 1 + width
        rows = (end - key_start) // stride
        table = np.frombuffer(self.buf, dtype=np.uint8, count=rows * stride, offset=key_start)
        table = table.reshape(rows, stride)
        same_key = table[:, 0] == self.buf[key_start]
        count = rows if bool(same_key.all()) else int(np.argmin(same_key))
        values = np.ascontiguousarray(table[:count, 1:]).view(dtype).reshape(count)
        return values, key_start + count * stride

    # --------------------------------------------------------------------------------------
    # messages
    # --------------------------------------------------------------------------------------

    def params(self, start: int, end: int, schema: dict, message: str) -> dict[str, int | float | bool]:
        values: dict[str, int | float | bool] = {}
        for number, wire, a, b in self.fields(start, end, message):
            if number not in schema:
                continue
            name, kind = schema[number]
            what = f"{message}.{name}"
            if wire == _BYTES and kind != "float":  # a packed repeated uint32 (BVLC's kernel_size)
                packed = self.packed_varints(a, b, what)
                if packed:
                    values[name] = self.scalar(kind, _VARINT, packed[-1], b, what)
            elif wire == _BYTES:
                packed = self.numbers(a, b, "<f4", what)
                if len(packed):
                    values[name] = float(packed[-1])
            else:
                values[name] = self.scalar(kind, wire, a, b, what)
        return values

    def blob(self, start: int, end: int, message: str) -> torch.Tensor:
        shape: list[int] | None = None
        legacy = {}
        floats: list[np.ndarray] = []
        doubles: list[np.ndarray] = []
        pos = start
        while pos < end:
            key_start = pos
            number, wire, a, b, pos = self.field(pos, end, message)
            if number == 7 and wire == _BYTES:
                shape = []
                for dim_number, dim_wire, c, d in self.fields(a, b, f"{message}.shape"):
                    if dim_number != 1:
                        continue
                    dims = self.packed_varints(c, d, f"{message}.shape.dim") if dim_wire == _BYTES else [c]
                    shape.extend(dims)
            elif number in (5, 8):
                dtype, width, into = ("<f4", 4, floats) if number == 5 else ("<f8", 8, doubles)
                name = "data" if number == 5 else "double_data"
                if wire == _BYTES:
                    into.append(self.numbers(a, b, dtype, f"{message}.{name}"))
                elif (number, wire) in ((5, _FIXED32), (8, _FIXED64)):
                    # Unpacked: one field per value; the one-byte key of fields < 16 repeats.
                    values, pos = self.unpacked_run(key_start, end, width, dtype)
                    into.append(values)
                else:
                    raise self.fail(f"{message}.{name} has wire type {wire}", key_start)
            elif number in (1, 2, 3, 4) and wire == _VARINT:
                legacy[("num", "channels", "height", "width")[number - 1]] = a
        # Caffe (Blob::FromProto): double_data when present, else data.
        values = np.concatenate(doubles) if doubles else np.concatenate(floats) if floats else np.zeros(0)
        if shape is None:
            if not legacy:
                raise self.fail(f"{message} has {values.size} values but no shape", start)
            shape = [legacy.get(k, 0) for k in ("num", "channels", "height", "width")]
        if any(d >= 1 << 63 for d in shape):
            raise self.fail(f"{message} has a negative dimension in its shape {shape}", start)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if values.size != count:
            raise self.fail(
                f"{message} has shape {tuple(shape)} ({count} values) but holds {values.size} values "
                "(the file is truncated or corrupt)",
                start,
            )
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)

    def layer(self, start: int, end: int, index: int, v1: bool) -> CaffeLayer:
        names = (4, 5, 2, 3, 6) if v1 else (1, 2, 3, 4, 7)  # name, type, bottom, top, blobs
        schemas = _V1_LAYER_PARAMS if v1 else _LAYER_PARAMS
        message = f"{'layers' if v1 else 'layer'}[{index}]"
        layer = CaffeLayer(name="", type="")
        for number, wire, a, b in self.fields(start, end, message):
            if number == names[0] and wire == _BYTES:
                layer.name = self.text(a, b)
            elif number == names[1] and wire == (_VARINT if v1 else _BYTES):
                layer.type = V1_LAYER_TYPES.get(a, f"V1 type {a}") if v1 else self.text(a, b)
            elif number in names[2:4] and wire == _BYTES:
                (layer.bottom if number == names[2] else layer.top).append(self.text(a, b))
            elif number == names[4] and wire == _BYTES:
                layer.blobs.append(self.blob(a, b, f"{message} {layer.name!r} blobs[{len(layer.blobs)}]"))
            elif number in schemas and wire == _BYTES:
                name, schema = schemas[number]
                layer.params[name] = self.params(a, b, schema, f"{message} {layer.name!r} {name}")
            elif v1 and number == 1 and wire == _BYTES:
                self.v0_layer(a, b, layer, message)
        return layer

    def v0_layer(self, start: int, end: int, layer: CaffeLayer, message: str) -> None:
        """The oldest layout: a V0LayerParameter nested in the V1 layer (name 1, type 2, blobs 50)."""
        for number, wire, a, b in self.fields(start, end, f"{message}.layer"):
            if number == 1 and wire == _BYTES:
                layer.name = self.text(a, b)
            elif number == 2 and wire == _BYTES:
                layer.type = self.text(a, b)
            elif number == 50 and wire == _BYTES:
                layer.blobs.append(self.blob(a, b, f"{message} {layer.name!r} blobs[{len(layer.blobs)}]"))

    def net(self) -> CaffeModel:
        model = CaffeModel(source=self.source)
        counts = {True: 0, False: 0}
        for number, wire, a, b in self.fields(0, len(self.buf), "NetParameter"):
            if number == 1 and wire == _BYTES:
                model.name = self.text(a, b)
            elif number in (100, 2) and wire == _BYTES:
                v1 = number == 2
                layer = self.layer(a, b, counts[v1], v1)
                counts[v1] += 1
                _add_layer(model, layer, self.source)
        if not model:
            raise ValueError(
                f"{self.source}: no layers found (neither the 'layer' field 100 nor the V1 'layers' field "
                "2 of NetParameter): not a caffemodel"
            )
        model.format = "layers" if counts[True] and not counts[False] else "layer"
        return model


def _add_layer(model: CaffeModel, layer: CaffeLayer, source: str) -> None:
    """Keep one layer per name. A train/test prototxt may repeat a name for per-phase layers without
    weights (e.g. 'reshape-data'); a repeated name with weights in both would make the file ambiguous."""
    seen = model.get(layer.name)
    if seen is None or not seen.blobs:
        model[layer.name] = layer
    elif layer.blobs:
        raise ValueError(f"{source}: two layers named {layer.name!r} both hold weights; which one is meant?")


def parse_net_parameter(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> CaffeModel:
    """A serialised NetParameter (the bytes of a caffemodel) -> :class:`CaffeModel`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{source}: the file is empty")
    return _Parser(data, source).net()


def read_caffemodel(path: str | os.PathLike) -> CaffeModel:
    """Read a ``.caffemodel`` file (a NetParameter with weights) into a :class:`CaffeModel`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"caffemodel must be an existing file, got {str(file)!r}")
    return parse_net_parameter(file.read_bytes(), source=repr(str(file)))


def is_caffemodel(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a caffemodel rather than a PyTorch or safetensors file.

    By name (``.caffemodel``), else by content: ``torch.save`` writes a zip (``PK``) or a pickle
    (``0x80``), safetensors an 8-byte header length then ``{``; a NetParameter starts with a field
    key. Caffe's own snapshots often have no suffix (``..._iter_310000``).
    """
    file = Path(path)
    if file.suffix == ".caffemodel":
        return True
    if file.suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        return False
    with file.open("rb") as handle:
        head = handle.read(9)
    return not (head[:2] == b"PK" or head[:1] == b"\x80" or head[8:9] == b"{")


# ----------------------------------------------------------------------------------------------
# loading a converted file into a model (timm's custom_load path)
# ----------------------------------------------------------------------------------------------


def read_weights(path: str | os.PathLike) -> dict:
    """A caffemodel as a :class:`CaffeModel`, any other file through ``weights.read_checkpoint``
    (``.safetensors`` or ``torch.save``, read without running code from it)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint must be an existing file, got {str(file)!r}")
    return read_caffemodel(file) if is_caffemodel(file) else read_checkpoint(file)
