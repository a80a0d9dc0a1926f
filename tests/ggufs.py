"""Tiny GGUFs written with the `gguf` package for shape- and failure-specific tests."""
import numpy as np
import gguf


def write_unknown_arch(path):
    """A well-formed GGUF whose architecture llama.cpp does not know (it must refuse it)."""
    w = gguf.GGUFWriter(str(path), "nonesuch")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    return _finish(w, path)


def _finish(w, path):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_no_shape(path):
    """A GGUF with an architecture but none of the shape keys (the estimate's fallback case)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    return _finish(w, path)


def _tokenizer_fields(src):
    """The tokenizer metadata of a real GGUF (read with the gguf package)."""
    reader = gguf.GGUFReader(src)
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append((key, field.contents(), vtype, sub))
    return out, len(reader.fields["tokenizer.ggml.tokens"].data)


_TOKENIZERS = {}


def write_shaped(path, tokenizer_src, arch="llama", n_layer=2, n_embd=64, n_head=4,
                 n_head_kv=2, head_dim=None, n_ff=128, n_ctx_train=4096, tied=True, seed=0,
                 bias=False, sliding_window=0):
    """A tiny model of a given shape with a real tokenizer and small random f16/f32 weights."""
    if tokenizer_src not in _TOKENIZERS:
        _TOKENIZERS[tokenizer_src] = _tokenizer_fields(tokenizer_src)
    fields, n_vocab = _TOKENIZERS[tokenizer_src]
    hd = head_dim or n_embd // n_head
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)

    def mat(rows, cols):
        return (0.02 * rng.standard_normal((rows, cols))).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", mat(n_vocab, n_embd))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_head * hd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * hd, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * hd, n_embd))
        if bias:
            for name, n in (("attn_q", n_head * hd), ("attn_k", n_head_kv * hd),
                            ("attn_v", n_head_kv * hd)):
                w.add_tensor(p + name + ".bias", np.zeros(n, dtype=np.float32))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_head * hd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
    return _finish(w, path)
