"""Exact attribution through a recorded training: replay its optimizer steps and run the
adjoint backwards (metagradients). `unroll` is the entry point; recording is
`run.watch(model, optimizer=opt)` or `logix.record_trajectory`."""

from logix.unroll.optimizers import FunctionalOptimizer
from logix.unroll.replay import unroll

__all__ = ["FunctionalOptimizer", "unroll"]
