"""The lmx worker: one process per GPU holding the llama.cpp backend once."""
