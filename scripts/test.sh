#!/usr/bin/env bash
# Set up what is missing, then run the whole test suite on the CPU.
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -q "$@"
