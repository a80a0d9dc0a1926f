"""Read a GGUF's metadata keys fast, without its tensors or its tokenizer strings.

The broker must never stall its loop: `gguf.GGUFReader` builds a Python object for every
string of the tokenizer (9.3 s for Gemma 3's 262k-token vocabulary on this project's CI
machine), while the estimate needs a dozen scalars. This reader walks the header with `struct`
over an mmap: scalars and short arrays (per-layer values, languages) are returned, and long arrays
are returned as their element count only. Layout: GGUF v2/v3 (little-endian), see
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""
import mmap
import struct

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
SHORT_ARRAY = 4096          # per-layer arrays are short; tokenizer arrays are not


class ArrayLength(int):
    """A long array, summarised by its element count."""


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF header."""


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"truncated at byte {self.pos}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self):
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"string of {n} bytes runs past the end at {self.pos}")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            return self.array()
        raise GGUFFormatError(f"unknown value type {vtype} at byte {self.pos}")

    def array(self):
        etype, count = self.take("<I"), self.take("<Q")
        if etype in _SCALARS and count <= SHORT_ARRAY:
            return [self.take(_SCALARS[etype]) for _ in range(count)]
        if etype == STRING and count <= SHORT_ARRAY:
            return [self.string() for _ in range(count)]
        if etype in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[etype])
        elif etype == STRING:
            self.pos = _skip_strings(self.buf, self.pos, count)
        else:
            for _ in range(count):
                self.value(etype)
        if self.pos > len(self.buf):
            raise GGUFFormatError("array runs past the end of the file")
        return ArrayLength(count)


_U64 = struct.Struct("<Q")


def _skip_strings(buf, pos, count):
    """The position after `count` length-prefixed strings from pos (the tokenizer's arrays:
    one unpack per string in a tight loop, 4x faster than the cursor's checked take)."""
    unpack = _U64.unpack_from
    try:
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
    except struct.error:
        raise GGUFFormatError(f"string array runs past the end at byte {pos}") from None
    return pos


def read_metadata(path, with_tensors=False):
    """The metadata map of a GGUF file (plus 'GGUF.tensors' if asked); GGUFFormatError if not one."""
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GGUFFormatError("empty file") from None
    with buf:
        cur = _Cursor(buf)
        if cur.take("4s") != MAGIC:
            raise GGUFFormatError("no GGUF magic")
        version = cur.take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        if n_kv > 1 << 20 or n_tensors > 1 << 24:
            raise GGUFFormatError(f"implausible counts: {n_kv} keys, {n_tensors} tensors")
        meta = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.take("<I"))
        if with_tensors:
            meta["GGUF.tensors"] = [_tensor_info(cur) for _ in range(n_tensors)]
        return meta


def _tensor_info(cur):
    """(name, ne list in GGML order, ggml type id) of one tensor info record."""
    name = cur.string()
    n_dims = cur.take("<I")
    if n_dims > 8:
        raise GGUFFormatError(f"tensor {name!r} claims {n_dims} dimensions")
    ne = [cur.take("<Q") for _ in range(n_dims)]
    ggml_type = cur.take("<I")
    cur.take("<Q")  # offset into the data section
    return name, ne, ggml_type
