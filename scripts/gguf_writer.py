"""A GGUF (version 3, little-endian) writer, standard library only.

Written from the published format description: magic "GGUF", version, tensor count and metadata
count (u64), key/value pairs (u64-length strings, u32 value types), tensor infos (name, dimension
count, dimensions in ggml order with the contiguous one first, ggml type, offset into the data
section), then the data section, which starts at the next multiple of general.alignment (32 when
absent) and holds every tensor at an aligned offset.

Used by tests/fuzz/make_corpus.py (seed files) and scripts/make_gguf_fixtures.py (test models).
"""
import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}

# ggml type numbers and (elements per block, bytes per block) of the types the tools here write.
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q4_K, GGML_Q6_K, GGML_BF16 = 0, 1, 2, 8, 12, 14, 30
GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q2_K, GGML_Q3_K, GGML_Q5_K = 3, 6, 7, 10, 11, 13
GGML_IQ4_NL, GGML_IQ4_XS = 20, 23
GGML_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q8_0: (32, 34),
              GGML_Q4_K: (256, 144), GGML_Q6_K: (256, 210), GGML_BF16: (1, 2),
              GGML_Q4_1: (32, 20), GGML_Q5_0: (32, 22), GGML_Q5_1: (32, 24),
              GGML_Q2_K: (256, 84), GGML_Q3_K: (256, 110), GGML_Q5_K: (256, 176),
              GGML_IQ4_NL: (32, 18), GGML_IQ4_XS: (256, 136)}


def _string(text):
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack("<Q", len(data)) + data


def _value(vtype, value):
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        element, items = value
        out = struct.pack("<IQ", element, len(items))
        return out + b"".join(_value(element, item) for item in items)
    return struct.pack(_SCALAR[vtype], value)


class GgufWriter:
    def __init__(self, alignment=32):
        self.alignment = alignment
        self.kv = []        # (key, type, value)
        self.tensors = []   # (name, dims in ggml order, ggml type, raw bytes)

    def add(self, key, vtype, value):
        self.kv.append((key, vtype, value))

    def add_tensor(self, name, dims, ggml_type, raw):
        block, block_bytes = GGML_BLOCK[ggml_type]
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block != 0 or len(raw) != n // block * block_bytes:
            raise ValueError(f"{name}: {len(raw)} bytes do not fit dims {dims} of type {ggml_type}")
        self.tensors.append((name, list(dims), ggml_type, bytes(raw)))

    def to_bytes(self):
        a = self.alignment
        out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
        for key, vtype, value in self.kv:
            out += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
        offset = 0
        offsets = []
        for name, dims, ggml_type, raw in self.tensors:
            offsets.append(offset)
            out += _string(name) + struct.pack("<I", len(dims))
            out += b"".join(struct.pack("<Q", d) for d in dims)
            out += struct.pack("<IQ", ggml_type, offset)
            offset += (len(raw) + a - 1) // a * a
        out += b"\0" * (-len(out) % a)
        for (name, dims, ggml_type, raw), at in zip(self.tensors, offsets):
            out += raw + b"\0" * (-len(raw) % a)
        return bytes(out)

    def write(self, path):
        with open(path, "wb") as f:
            f.write(self.to_bytes())
