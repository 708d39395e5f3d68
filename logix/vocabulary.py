"""Every named choice logix offers, defined once: config validation, the Python API and the CLI
all read these tuples, so a new kind is added in one place."""

from __future__ import annotations

import difflib

from logix.errors import ChoiceError

RUN_MODES = ("log", "query")  # logix.init(mode=...): write a store, or capture queries against one
# Conv1D is Hugging Face's GPT-2 layer (weight [d_in, d_out]); Conv1d is torch.nn.Conv1d.
LAYER_TYPES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding", "MultiheadAttention")
UNCOVERED_MODES = ("notice", "error")  # capture.uncovered: what an uncaptured matrix parameter does
UNFIRED_MODES = ("error", "notice")  # capture.unfired: a watched module the first block never reached
LOSS_REDUCTIONS = ("mean", "sum")  # how the loop reduces its loss over the batch
PROJECTION_KINDS = ("identity", "random", "pca", "kfac-whitened")
FITTED_PROJECTION_KINDS = ("pca", "kfac-whitened")  # the kinds set by `run.fit_projections()`
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
STATISTICS = ("raw", "kfac", "ekfac")  # curvature statistics a store can hold
FACTOR_STATISTICS = ("kfac", "ekfac")  # the ones read from the capture hooks' K-FAC factors
PRECONDITIONERS = ("identity", "raw", "kfac", "ekfac")
FISHERS = ("empirical", "true")  # whose labels the curvature averages over: the data's, the model's
QUERY_FISHERS = ("auto",) + FISHERS  # auto: the true Fisher when the store holds it
SCORE_MODES = ("dot", "cosine", "relative")
SELF_INFLUENCE_MODES = ("dot", "relative")
RERANK_NORMS = ("window", "sequence")  # whose norm a re-ranked window is divided by
RAW_FORMS = ("auto", "eigen", "gram")  # how the raw preconditioner inverts F + λI
VERIFY_LEVELS = ("none", "quick", "full")  # how much of a store open_store checks
MISSING_RANKS = ("error", "warn")  # what open_store does when a rank the manifest names has no index
OPTIMIZER_KINDS = ("sgd", "adam", "adamw")  # torch.optim classes a recorded trajectory replays exactly
INDEX_METRICS = ("cosine", "dot")  # approximate indexes: unit rows (cosine, relative modes) or rows as stored


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `choices`, else a ChoiceError naming the closest valid one."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ChoiceError(f"unknown {what} {value!r}; {hint}choose from {', '.join(choices)}")
