#!/usr/bin/env bash
# Style checks (configured in pyproject.toml): ruff's linter and formatter, both must be clean.
source "$(dirname "$0")/env.sh"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
