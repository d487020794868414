"""``kvpolicy compare`` run in the test's own process on a model it already loaded, with the model's
generate calls counted (resume must not redo finished rows)."""

from __future__ import annotations

from benchmarks import compare as compare_mod
from benchmarks.cli import build_parser


class CountingModel:
    """Wraps a real model and counts its generate calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.model.generate(*args, **kwargs)


def compare_counting(argv: list[str], model) -> tuple[dict, CountingModel]:
    """``kvpolicy compare *argv`` on ``model`` (quiet): the comparison's result and the call counter."""
    args = build_parser().parse_args(["compare", *argv])
    counting = CountingModel(model)
    result = compare_mod.Comparison(compare_mod.settings_from_args(args), model=counting, log=lambda m: None).run()
    return result, counting
