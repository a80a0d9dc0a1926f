"""The lmx broker: admission accounting, agent registry and request queue (never CUDA)."""
