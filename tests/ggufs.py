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
