"""Reader and writer of the Keras SavedModel pieces that hold a small model's weights, without
TensorFlow: `variables/variables.{index,data-00000-of-00001}` (TF's tensor bundle) and
`keras_metadata.pb` (the model's layer config as JSON). The LAION CLIP-based NSFW detector is
released as such a folder zipped (`clip_autokeras_binary_nsfw.zip`); curation/nsfw.py restates it
in torch from what this module reads, and curation/tiny.py writes its tiny twin with `write_model`.

Formats (facts from TensorFlow's tensor_bundle.proto / table format, LevelDB's SSTable):
- variables.index: an SSTable. Data blocks of prefix-compressed entries (varint shared, varint
  unshared, varint value length, key suffix, value) + a restart array; each block followed by a
  1-byte compression type and a masked crc32c; a 48-byte footer (metaindex + index block handles,
  magic 0xdb4775248b80fb57). Key "" holds the BundleHeaderProto; every other key is a checkpoint
  name (e.g. `layer_with_weights-2/kernel/.ATTRIBUTES/VARIABLE_VALUE`) -> BundleEntryProto (dtype,
  shape, shard, offset, size, masked crc32c of the bytes).
- variables.data-*: the tensors' raw little-endian bytes at their offsets; a string tensor is its
  lengths (varint64 each), a 4-byte masked crc32c of the lengths, then the bytes.
- keras_metadata.pb: SavedMetadata{repeated SavedObject nodes = 1}; SavedObject{node_id = 2,
  node_path = 3, identifier = 4, metadata = 5 (JSON)}; the `root` node's JSON is the model config.
- saved_model.pb: SavedModel{meta_graphs = 2{graph_def = 2{node = 1}}}; NodeDef{name = 1, op = 2,
  input = 3, attr = 5}. Keras bakes an adapted StringLookup's vocabulary into the graph, not into
  the variables: a node that initialises a lookup table takes a string Const (keys) followed by an
  int64 Const (indices) as inputs. `lookup_tables` returns those pairs in graph order; nothing
  else of the graph is read (no op is ever executed).
Only single-shard, uncompressed bundles (what Keras writes) are read; anything else is refused
with the reason.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

MAGIC = 0xDB4775248B80FB57
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 10: np.bool_}  # TF DataType enum
DT_STRING = 7
INDEX, DATA, META = "variables/variables.index", "variables/variables.data-00000-of-00001", "keras_metadata.pb"
GRAPH = "saved_model.pb"


class KerasWeightsError(ValueError):
    """The file is not a readable Keras SavedModel weight bundle (says which part and why)."""


# --- crc32c (Castagnoli), as TF/LevelDB use it, masked for storage ---------------------------------
def _crc_table() -> list[int]:
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC = _crc_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    tab = _CRC
    for b in data:
        c = tab[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format (the few messages here) -------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise KerasWeightsError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _put_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a protobuf message: ints for varint/fixed, bytes for length-delimited."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wt == 5:
            v, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise KerasWeightsError("truncated protobuf field")
            v, pos = buf[pos:pos + n], pos + n
        else:
            raise KerasWeightsError(f"unsupported protobuf wire type {wt}")
        out.append((num, v))
    return out


def _msg(*fields: tuple[int, object]) -> bytes:
    out = bytearray()
    for num, v in fields:
        if isinstance(v, (bytes, str)):
            v = v.encode() if isinstance(v, str) else v
            out += _put_varint(num << 3 | 2) + _put_varint(len(v)) + v
        elif isinstance(v, tuple) and v[0] == "fixed32":
            out += _put_varint(num << 3 | 5) + struct.pack("<I", v[1])
        else:
            out += _put_varint(num << 3) + _put_varint(int(v))
    return bytes(out)


# --- SSTable ------------------------------------------------------------------------------------
def _block(data: bytes, off: int, size: int) -> list[tuple[bytes, bytes]]:
    if off + size + 5 > len(data):
        raise KerasWeightsError("variables.index: block beyond the end of the file (truncated?)")
    blk, kind = data[off:off + size], data[off + size]
    if kind != 0:
        raise KerasWeightsError(f"variables.index: compressed block (type {kind}) not supported")
    if struct.unpack_from("<I", data, off + size + 1)[0] != masked_crc(blk + bytes([kind])):
        raise KerasWeightsError("variables.index: block checksum mismatch (corrupt file)")
    n_restarts = struct.unpack_from("<I", blk, size - 4)[0]
    end = size - 4 - 4 * n_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(blk, pos)
        unshared, pos = _varint(blk, pos)
        vlen, pos = _varint(blk, pos)
        key = key[:shared] + blk[pos:pos + unshared]
        pos += unshared
        entries.append((key, blk[pos:pos + vlen]))
        pos += vlen
    return entries


def read_table(data: bytes) -> dict[bytes, bytes]:
    if len(data) < 48 or struct.unpack_from("<Q", data, len(data) - 8)[0] != MAGIC:
        raise KerasWeightsError("variables.index: not a TF table (bad footer magic)")
    foot = data[len(data) - 48:len(data) - 8]
    _, p = _varint(foot, 0)
    _, p = _varint(foot, p)
    ioff, p = _varint(foot, p)
    isize, p = _varint(foot, p)
    out = {}
    for _, handle in _block(data, ioff, isize):
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        out.update(_block(data, off, size))
    return out


def write_table(entries: dict[bytes, bytes]) -> bytes:
    """One data block (restart at every entry), one index entry, an empty metaindex, the footer."""
    def block(items):
        body, restarts = bytearray(), []
        for k, v in items:
            restarts.append(len(body))
            body += _put_varint(0) + _put_varint(len(k)) + _put_varint(len(v)) + k + v
        restarts = restarts or [0]
        body += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
        return bytes(body) + b"\x00" + struct.pack("<I", masked_crc(bytes(body) + b"\x00"))

    items = sorted(entries.items())
    out = bytearray(block(items))
    data_handle = _put_varint(0) + _put_varint(len(out) - 5)
    meta_off = len(out)
    out += block([])
    index_off = len(out)
    out += block([(items[-1][0], data_handle)])
    footer = (_put_varint(meta_off) + _put_varint(index_off - meta_off - 5)
              + _put_varint(index_off) + _put_varint(len(out) - index_off - 5))
    out += footer.ljust(40, b"\x00") + struct.pack("<Q", MAGIC)
    return bytes(out)


# --- the bundle --------------------------------------------------------------------------------
def _tensor(name: str, entry: bytes, data: bytes):
    f = dict()
    dims = []
    for num, v in _fields(entry):
        if num == 2:
            dims = [dict(_fields(d)).get(1, 0) for n2, d in _fields(v) if n2 == 2]
        else:
            f[num] = v
    dtype, shard, off, size = f.get(1, 0), f.get(3, 0), f.get(4, 0), f.get(5, 0)
    if shard != 0 or f.get(7) is not None:
        raise KerasWeightsError(f"{name}: sharded or sliced tensors are not supported")
    if off + size > len(data):
        raise KerasWeightsError(f"{name}: bytes {off}..{off + size} beyond the data file ({len(data)} bytes; truncated?)")
    raw = data[off:off + size]
    if 6 in f and f[6] != masked_crc(raw):
        raise KerasWeightsError(f"{name}: checksum mismatch (corrupt data file)")
    n = int(np.prod(dims)) if dims else 1
    if dtype == DT_STRING:
        lens, pos = [], 0
        for _ in range(n):
            ln, pos = _varint(raw, pos)
            lens.append(ln)
        pos += 4  # masked crc32c of the lengths (the whole tensor's crc is checked above)
        vals = []
        for ln in lens:
            vals.append(raw[pos:pos + ln])
            pos += ln
        if pos != len(raw):
            raise KerasWeightsError(f"{name}: string tensor of {len(raw)} bytes does not match its lengths")
        return np.array(vals, dtype=object).reshape(dims)
    if dtype not in DTYPES:
        raise KerasWeightsError(f"{name}: unsupported dtype {dtype}")
    dt = np.dtype(DTYPES[dtype]).newbyteorder("<")
    if size != n * dt.itemsize:
        raise KerasWeightsError(f"{name}: {size} bytes for shape {dims} of {dt}")
    return np.frombuffer(raw, dt).reshape(dims).copy()


def _files(path: str | Path) -> dict[str, bytes]:
    """The three members of a SavedModel folder, or of a zip holding one (any top folder name)."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = {m: (p / m).read_bytes() for m in (INDEX, DATA, META, GRAPH) if (p / m).exists()}
    elif zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            found = {}
            for info in z.infolist():
                for m in (INDEX, DATA, META, GRAPH):
                    if info.filename == m or info.filename.endswith("/" + m):
                        if info.file_size > 1 << 30:
                            raise KerasWeightsError(f"{path}: {info.filename} is {info.file_size} bytes (refused)")
                        found[m] = z.read(info)
    elif p.exists():
        raise KerasWeightsError(f"{path}: neither a SavedModel folder nor a zip of one")
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    missing = [m for m in (INDEX, DATA, META) if m not in found]
    if missing:
        raise KerasWeightsError(f"{path}: not a Keras SavedModel (missing {', '.join(missing)})")
    return found


def _const(node: list) -> tuple[bytes, np.ndarray] | None:
    """(name, value) of a Const NodeDef holding a string or int64 vector, else None."""
    f = dict(node)
    if f.get(2) != b"Const":
        return None
    for num, v in node:
        entry = dict(_fields(v)) if num == 5 else {}
        if entry.get(1) == b"value":
            tp = _fields(dict(_fields(entry[2]))[8])
            dt = dict(tp).get(1)
            if dt == DT_STRING:
                return f[1], np.array([x for k, x in tp if k == 8], dtype=object)
            if dt == 9 and 4 in dict(tp):
                return f[1], np.frombuffer(dict(tp)[4], "<i8").copy()
    return None


def lookup_tables(graph: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    """(keys: bytes objects, indices: int64) of every lookup table initialised in the graph, in
    graph order (= the order the layers created their tables)."""
    meta = [v for n, v in _fields(graph) if n == 2]
    if not meta:
        raise KerasWeightsError("saved_model.pb: no meta graph")
    gdef = [v for n, v in _fields(meta[0]) if n == 2]
    nodes = [_fields(v) for n, v in _fields(gdef[0] if gdef else b"") if n == 1]
    consts = {c[0]: c[1] for c in map(_const, nodes) if c is not None}
    out = []
    for node in nodes:
        ins = [v.split(b":")[0] for n, v in node if n == 3]
        for a, b in zip(ins, ins[1:]):
            ka, kb = consts.get(a), consts.get(b)
            if ka is not None and kb is not None and ka.dtype == object and kb.dtype != object and len(ka) == len(kb):
                out.append((ka, kb))
    return out


def read_model(path: str | Path) -> tuple[dict, dict[str, np.ndarray], list]:
    """(model config JSON of the root node, {checkpoint name: array}, lookup tables of the graph
    (`lookup_tables`; [] without saved_model.pb)) of a SavedModel folder or zip."""
    files = _files(path)
    table = read_table(files[INDEX])
    header = dict(_fields(table.pop(b"", b"")))
    if header.get(1, 1) != 1 or header.get(2, 0) != 0:
        raise KerasWeightsError(f"{path}: only single-shard little-endian bundles are supported")
    tensors = {k.decode(): _tensor(k.decode(), v, files[DATA]) for k, v in table.items()
               if k != b"_CHECKPOINTABLE_OBJECT_GRAPH"}
    config = None
    for num, node in _fields(files[META]):
        f = dict(_fields(node)) if num == 1 else {}
        if f.get(3) == b"root":
            config = json.loads(f[5])
    if config is None:
        raise KerasWeightsError(f"{path}: keras_metadata.pb has no root node")
    return config, tensors, lookup_tables(files[GRAPH]) if GRAPH in files else []


def _graph(tables: list) -> bytes:
    """A SavedModel whose graph holds only the lookup-table initialisers: per table a string Const
    (keys), an int64 Const (indices) and a LookupTableImportV2 node taking both."""
    def const(name, arr):
        if arr.dtype == object:
            tensor = _msg((1, DT_STRING), (2, _msg((2, _msg((1, len(arr)))))), *[(8, bytes(v)) for v in arr])
            dt = DT_STRING
        else:
            tensor = _msg((1, 9), (2, _msg((2, _msg((1, len(arr)))))), (4, np.asarray(arr, "<i8").tobytes()))
            dt = 9
        return _msg((1, name), (2, "Const"), (5, _msg((1, "dtype"), (2, _msg((6, dt))))),
                    (5, _msg((1, "value"), (2, _msg((8, tensor))))))
    nodes = []
    for i, (keys, vals) in enumerate(tables):
        nodes += [const(f"table_{i}_keys", keys), const(f"table_{i}_values", np.asarray(vals)),
                  _msg((1, f"table_{i}_init"), (2, "LookupTableImportV2"), (3, f"table_{i}"),
                       (3, f"table_{i}_keys"), (3, f"table_{i}_values"))]
    return _msg((1, 1), (2, _msg((2, b"".join(_msg((1, n)) for n in nodes)))))


def write_model(path: str | Path, config: dict, tensors: dict[str, np.ndarray], tables: list = ()) -> Path:
    """Write a zip in the released layout (<stem>/keras_metadata.pb, <stem>/variables/..., and
    <stem>/saved_model.pb holding only the lookup tables' Consts). Numeric arrays and 1-d object
    arrays of bytes (string tensors) only. Deterministic bytes."""
    data = bytearray()
    entries = {b"": _msg((1, 1), (3, _msg((1, 1))))}  # num_shards 1, little endian, version{producer 1}
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype == object:
            vals = [bytes(v) for v in a.reshape(-1)]
            lens = b"".join(_put_varint(len(v)) for v in vals)
            raw = lens + struct.pack("<I", masked_crc(b"".join(struct.pack("<Q", len(v)) for v in vals))) + b"".join(vals)
            dtype = DT_STRING
        else:
            dtype = {np.dtype(v): k for k, v in DTYPES.items()}[a.dtype]
            raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        shape = _msg(*[(2, _msg((1, d))) for d in a.shape])
        entries[name.encode()] = _msg((1, dtype), (2, shape), (4, len(data)), (5, len(raw)), (6, ("fixed32", masked_crc(raw))))
        data += raw
    meta = _msg((1, _msg((2, 0), (3, "root"), (4, "_tf_keras_network"), (5, json.dumps(config)))))
    path = Path(path)
    stem = path.name[:-4] if path.name.endswith(".zip") else path.name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for member, blob in ((META, meta), (GRAPH, _graph(list(tables))), (INDEX, write_table(entries)),
                             (DATA, bytes(data))):
            info = zipfile.ZipInfo(f"{stem}/{member}", date_time=(2022, 3, 9, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, blob)
    path.write_bytes(buf.getvalue())
    return path
