#!/usr/bin/env bash
# Set up what is missing, then run the end-to-end demo: train and log an MLP on 8x8 digits,
# inspect the store, and show the training images that most helped and hurt a few test images.
source "$(dirname "$0")/env.sh"
exec "$PY" examples/digits/demo.py "$@"
