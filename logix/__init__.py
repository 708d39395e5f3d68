"""logix: training data attribution with LoGra projected per-example gradients.

Log in three lines (`init`, `watch`, `with run(data_id=ids):`), then open the store and ask which
training examples made the model behave as it does (`open_store`, `InfluenceEngine`).
"""

__version__ = "0.1.0"

from logix.capture.tokens import TokenGradients
from logix.config import ConfigError, LogixConfig
from logix.run import Run, init
from logix.store.format import ModuleInfo, StoreError
from logix.store.gradients import Gradients


def __getattr__(name: str):
    # The query side is imported on first use so that logging does not pay for it.
    if name == "open_store":
        from logix.store.reader import open_store

        return open_store
    if name == "Store":
        from logix.store.reader import Store

        return Store
    if name == "InfluenceEngine":
        from logix.query.engine import InfluenceEngine

        return InfluenceEngine
    if name == "TokenScores":
        from logix.query.tokens import TokenScores

        return TokenScores
    if name == "measurements":
        import importlib

        return importlib.import_module("logix.measurements")
    if name == "combined_scores":
        from logix.query.segments import combined_scores

        return combined_scores
    if name == "stagewise_scores":
        from logix.query.stagewise import stagewise_scores

        return stagewise_scores
    raise AttributeError(f"module 'logix' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "Gradients",
    "InfluenceEngine",
    "LogixConfig",
    "ModuleInfo",
    "Run",
    "Store",
    "StoreError",
    "TokenGradients",
    "TokenScores",
    "combined_scores",
    "init",
    "measurements",
    "open_store",
    "stagewise_scores",
    "__version__",
]
