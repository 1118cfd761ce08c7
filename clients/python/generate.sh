#!/usr/bin/env bash
# Generates the Python client from the contract into ./generated (needs: pip install grpcio grpcio-tools), as the
# package queuectl_grpc: `from queuectl_grpc.v1 import queue_pb2, queue_pb2_grpc`. Not `queuectl`, the proto's
# own path, which an unrelated package on PyPI holds. protoc reads the proto under that name (-I NAME=DIR), so the
# generated modules import each other by it; a regular package (with __init__.py) is found in path order, where a
# namespace package would lose to any installed `queuectl`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/generated}"
mkdir -p "$out"
python3 -m grpc_tools.protoc -I "queuectl_grpc=$here/../../proto/queuectl" \
  --python_out="$out" --grpc_python_out="$out" queuectl_grpc/v1/queue.proto
touch "$out/queuectl_grpc/__init__.py" "$out/queuectl_grpc/v1/__init__.py"
echo "$out"
