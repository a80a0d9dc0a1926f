#!/usr/bin/env bash
# The layer streamer's GPU table (issue 4): every config, one JSON each, headlines in one file.
# Usage: benchmarks/stream_bench.sh OUTDIR [GGUF]   (GGUF: a model whose ffn matrices to stream)
set -euo pipefail
out=${1:?usage: stream_bench.sh OUTDIR [GGUF]}
mkdir -p "$out"
run() {  # name, then lmx-stream-demo arguments
  local name=$1; shift
  lmx-stream-demo "$@" --repeats 5 --json > "$out/$name.json"
  python3 - "$out/$name.json" "$name" "$*" <<'PY' >> "$out/headlines.txt"
import json, sys
from lmx.worker.streamer import headline
d = json.load(open(sys.argv[1]))
c = d["check"]
print(f"{sys.argv[2]}: lmx-stream-demo {sys.argv[3]}")
print(f"  {headline(d)}  check={'match' if c.get('match') else 'MISMATCH' if c['checked'] else '-'}")
PY
}
: > "$out/headlines.txt"
run seed-default   --kernel fma --n-layers 8  --bytes-per-layer 67108864  --compute-iters 64
run fma-16x64x64   --kernel fma --n-layers 16 --bytes-per-layer 67108864  --compute-iters 64
run fma-16x256x512 --kernel fma --n-layers 16 --bytes-per-layer 268435456 --compute-iters 512
run gemv-llama1b-ffn --kernel gemv --rows 8192 --cols 2048 --n-layers 16
if [ -n "${2:-}" ]; then run gemv-gguf --kernel gemv --gguf "$2" --n-layers 16; fi
cat "$out/headlines.txt"
