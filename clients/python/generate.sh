#!/usr/bin/env bash
# Generates the Python client from the contract into ./generated (needs: pip install grpcio grpcio-tools).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/generated}"
mkdir -p "$out"
python3 -m grpc_tools.protoc -I "$here/../../proto" \
  --python_out="$out" --grpc_python_out="$out" "$here/../../proto/queuectl/v1/queue.proto"
echo "$out"
