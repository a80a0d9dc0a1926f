#!/usr/bin/env python3
"""Make GGUFs with a real model's shape and tokenizer but random weights (for the GPU machine).

A real model is too big to carry to the GPU machine, so this runs in two steps:

    bin/synth_gguf.py skeleton REAL.gguf SKELETON.gguf     # CPU machine: metadata only, small
    bin/synth_gguf.py build SKELETON.gguf OUT.gguf          # GPU machine: add random tensors
    bin/synth_gguf.py shape PRESET TOKENIZER.gguf SKELETON.gguf
                                                         # a skeleton of a named model's shape
                                                         # (presets below), its vocabulary
                                                         # padded from a real tokenizer

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


# Shapes from the models' published configs (layers, width, heads, KV heads, FFN, vocab).
PRESETS = {
    "smollm2-360m": dict(arch="llama", n_layer=32, n_embd=960, n_head=15, n_head_kv=5,
                         n_ff=2560, n_vocab=49152, n_ctx=8192, bias=False),
    "qwen2-0.5b": dict(arch="qwen2", n_layer=24, n_embd=896, n_head=14, n_head_kv=2,
                       n_ff=4864, n_vocab=151936, n_ctx=32768, bias=True),
    "llama-3.2-1b": dict(arch="llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8,
                         n_ff=8192, n_vocab=128256, n_ctx=131072, bias=False),
}


def _tensor_specs(p):
    hd = p["n_embd"] // p["n_head"]
    q, kv, e, f = p["n_head"] * hd, p["n_head_kv"] * hd, p["n_embd"], p["n_ff"]
    specs = [["token_embd.weight", [e, p["n_vocab"]]], ["output_norm.weight", [e]]]
    for il in range(p["n_layer"]):
        b = f"blk.{il}."
        specs += [[b + "attn_norm.weight", [e]], [b + "attn_q.weight", [e, q]],
                  [b + "attn_k.weight", [e, kv]], [b + "attn_v.weight", [e, kv]],
                  [b + "attn_output.weight", [q, e]], [b + "ffn_norm.weight", [e]],
                  [b + "ffn_gate.weight", [e, f]], [b + "ffn_up.weight", [e, f]],
                  [b + "ffn_down.weight", [f, e]]]
        if p["bias"]:
            specs += [[b + "attn_q.bias", [q]], [b + "attn_k.bias", [kv]],
                      [b + "attn_v.bias", [kv]]]
    return specs


def shape(preset, tokenizer_src, dst):
    """A skeleton with a preset's shape and a real tokenizer padded to its vocabulary size."""
    p = PRESETS[preset]
    reader = gguf.GGUFReader(tokenizer_src)
    writer = gguf.GGUFWriter(dst, p["arch"])
    a = p["arch"]
    for key, value in (("block_count", p["n_layer"]), ("context_length", p["n_ctx"]),
                       ("embedding_length", p["n_embd"]), ("feed_forward_length", p["n_ff"]),
                       ("attention.head_count", p["n_head"]),
                       ("attention.head_count_kv", p["n_head_kv"])):
        writer.add_uint32(f"{a}.{key}", value)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{a}.rope.freq_base", 10000.0)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            value = value + [f"<|lmx_pad_{i}|>" for i in range(p["n_vocab"] - len(value))]
        elif key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value + [1 if key.endswith("type") else 0.0] * (p["n_vocab"] - len(value))
        vtype = field.types[0]
        writer.add_key_value(key, value, vtype,
                             sub_type=field.types[-1] if vtype == V.ARRAY else None)
    writer.add_string(SYNTH_KEY, json.dumps(_tensor_specs(p)))
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
    if sys.argv[1:2] == ["shape"] and len(sys.argv) == 5 and sys.argv[2] in PRESETS:
        shape(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] in ("skeleton", "build"):
        {"skeleton": skeleton, "build": build}[sys.argv[1]](sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__ + f"\npresets: {', '.join(PRESETS)}")
