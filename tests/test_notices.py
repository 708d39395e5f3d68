"""logix's warnings name the user's line, not logix's (`logix/notices.py`), and every warning
logix gives goes through that one helper."""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.notices import warn

PACKAGE = Path(logix.__file__).resolve().parent


def test_no_logix_module_calls_warnings_warn_itself():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "notices.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "warn"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "warnings"
            ):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"use logix.notices.warn (the user's call site) instead: {offenders}"


class WithPositions(nn.Module):
    """A position embedding called without a batch axis: the capture hook warns about it."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.pos(torch.arange(ids.shape[1]))  # the warning's user line
        return self.head(self.tok(ids) + positions)


def test_a_capture_hooks_warning_names_the_users_line(tmp_path):
    model = WithPositions()
    ids = torch.randint(0, 7, (2, 5))
    forward_line = inspect.getsource(WithPositions.forward).splitlines()[1]
    expected_line = inspect.getsourcelines(WithPositions.forward)[1] + 1
    assert "self.pos(" in forward_line
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with run(data_id=[0, 1]):
                logits = model(ids)
                F.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1)).backward()
    shared = [w for w in caught if "without a batch axis" in str(w.message)]
    assert len(shared) == 1
    assert Path(shared[0].filename).resolve() == Path(__file__).resolve()  # not capture/hooks.py
    assert shared[0].lineno == expected_line


def test_a_warning_deep_inside_logix_names_the_call_that_led_to_it(tmp_path):
    run = logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}})
    try:
        model = nn.Sequential(nn.Linear(3, 2))
        run.watch(model)
        with run(data_id=[0, 1]):
            model(torch.randn(2, 3)).sum().backward()
        run.flush()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            logix.InfluenceEngine(logix.open_store(tmp_path / "r"))  # warns: not finalized
    finally:
        run.finalize()
    notices = [w for w in caught if "not finalized" in str(w.message)]
    assert len(notices) == 1
    assert Path(notices[0].filename).resolve() == Path(__file__).resolve()
    assert notices[0].lineno == line


def test_warn_called_from_outside_logix_names_its_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        warn("hello", RuntimeWarning)
    assert caught[0].category is RuntimeWarning and caught[0].lineno == line
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()
