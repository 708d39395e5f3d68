"""logix: training data attribution with LoGra projected per-example gradients.

Log in three lines (`init`, `watch`, `with run(data_id=ids):`), then open the store and ask which
training examples made the model behave as it does (`open_store`, `InfluenceEngine`).
"""

from logix.capture.loss_probe import LossCheckNotice, LossReductionWarning
from logix.capture.tokens import TokenGradients
from logix.capture.trajectory import record_trajectory
from logix.config import LogixConfig
from logix.data import collate_with_ids, with_ids
from logix.errors import CaptureError, ChoiceError, ConfigError, LogixError, StoreError
from logix.run import Block, Run, StatisticsPass, init
from logix.store.format import ModuleInfo
from logix.store.gradients import Gradients
from logix.version import __version__

# The query side is imported on first use so that logging does not pay for it.
_LAZY = {
    "open_store": ("logix.store.reader", "open_store"),
    "Store": ("logix.store.reader", "Store"),
    "InfluenceEngine": ("logix.query.engine", "InfluenceEngine"),
    "TokenScores": ("logix.query.tokens", "TokenScores"),
    "Scores": ("logix.query.results", "Scores"),
    "TopK": ("logix.query.results", "TopK"),
    "Rerank": ("logix.query.rerank", "Rerank"),
    "ApproximateIndex": ("logix.query.index", "ApproximateIndex"),
    "build_index": ("logix.query.index_build", "build_index"),
    "open_index": ("logix.query.index", "open_index"),
    "SelfInfluence": ("logix.query.results", "SelfInfluence"),
    "load_result": ("logix.query.results", "load_result"),
    "combined_scores": ("logix.query.segments", "combined_scores"),
    "stagewise_scores": ("logix.query.stagewise", "stagewise_scores"),
    "measurements": ("logix.measurements", None),
    "render": ("logix.query.render", None),
    "losses": ("logix.losses", None),
    # The package, so that `import logix.unroll.replay` works: call `logix.unroll.unroll(...)`.
    "unroll": ("logix.unroll", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'logix' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


__all__ = [
    "ApproximateIndex",
    "Block",
    "CaptureError",
    "ChoiceError",
    "ConfigError",
    "LogixError",
    "LossCheckNotice",
    "LossReductionWarning",
    "Gradients",
    "InfluenceEngine",
    "LogixConfig",
    "ModuleInfo",
    "Rerank",
    "Run",
    "Scores",
    "SelfInfluence",
    "StatisticsPass",
    "Store",
    "StoreError",
    "TokenGradients",
    "TokenScores",
    "TopK",
    "build_index",
    "collate_with_ids",
    "combined_scores",
    "init",
    "load_result",
    "losses",
    "measurements",
    "open_index",
    "open_store",
    "record_trajectory",
    "render",
    "stagewise_scores",
    "unroll",
    "with_ids",
    "__version__",
]
