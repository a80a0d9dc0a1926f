#!/usr/bin/env python3
"""Make GGUFs with a real model's shape and tokenizer but random weights (for the GPU machine).

A real model is too big to carry to the GPU machine, so this runs in two steps:

    bin/synth_gguf.py skeleton REAL.gguf SKELETON.gguf     # CPU machine: metadata only, small
    bin/synth_gguf.py build SKELETON.gguf OUT.gguf          # GPU machine: add random tensors

The skeleton keeps every metadata key (the tokenizer included) and records each tensor's name
and shape in `lmx.synth.tensors`. `build` writes 2-D tensors as Q8_0 and the rest as F32, with
small random values (seeded), so llama.cpp loads and decodes it; memory use and speed depend
on shapes, the text is noise.
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

SYNTH_KEY = "lmx.synth.tensors"


def _copy_metadata(reader, writer, skip=()):
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", *skip):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == V.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def skeleton(src, dst):
    """Metadata and tensor shapes of src, no tensor data."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    _copy_metadata(reader, writer)
    specs = [[t.name, [int(n) for n in t.shape]] for t in reader.tensors]
    writer.add_string(SYNTH_KEY, json.dumps(specs))
    _finish(writer)


def build(src, dst, seed=0):
    """Random tensors with the skeleton's shapes: Q8_0 for matrices, F32 otherwise."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    _copy_metadata(reader, writer, skip=(SYNTH_KEY, "general.file_type"))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    rng = np.random.default_rng(seed)
    for name, ne in json.loads(reader.fields[SYNTH_KEY].contents()):
        shape = tuple(reversed(ne))                     # GGML order -> numpy order
        if len(shape) == 1 or name.endswith("_norm.weight") or ne[0] % 32:
            data = (1.0 + 0.02 * rng.standard_normal(shape)).astype(np.float32) \
                if "norm" in name else (0.02 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, data)
        else:
            data = (0.02 * rng.standard_normal(shape, dtype=np.float32))
            writer.add_tensor(name, gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
    _finish(writer)


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("skeleton", "build"):
        sys.exit(__doc__)
    {"skeleton": skeleton, "build": build}[sys.argv[1]](sys.argv[2], sys.argv[3])
