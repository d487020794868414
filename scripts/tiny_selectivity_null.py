"""Do the trained tiny models' layers differ in selectivity more than untrained weights' do? (issue 17)

`kvpolicy calibrate` records per layer and scale the share of attention on the current map
(ScaleKV's first ingredient) and the share of history attention near the query (history locality).
Untrained weights also give every layer a different value: how much is structure, how much is the
draw? For each trained preset this script calibrates, on the preset's calibration conditions and with
its own tokenizer and text encoder, the shipped transformer and ``--draws`` untrained transformers of
the same shape of each of two kinds:

- ``training init``: the weights ``kvpolicy train-tiny`` starts from, training seeds 0.. (seed 0 is
  where the shipped weights started);
- ``random init``: the seeded random weights of the ``*-tiny-random`` presets (per-head attention
  temperatures spread from 2.5 to 150), seeds 0...

Per scale it reports the spread over layers (standard deviation) of the current-map share and of the
history locality, for the trained model with a bootstrap interval over the calibration conditions
(resampled with replacement), and the median and the largest value over the untrained draws. The
trained spread is "beyond untrained" at a scale where its bootstrap interval lies above every draw.

    python scripts/tiny_selectivity_null.py --draws 16 --out benchmarks/results/tiny-models
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kvpolicy.attention_stats import HISTORY_LOCALITY, uniform_history_locality

CURRENT = "current_ratio"
MEASURES = (CURRENT, HISTORY_LOCALITY)


def per_condition_means(model, model_name: str, conditions: Sequence, measure_names=MEASURES) -> dict:
    """{measure: array (conditions, layers, scales)}: one calibration per condition (NaN where a
    measure has no value, e.g. history measures at scale 0)."""
    from benchmarks.calibrate import run_calibration

    out = {name: [] for name in measure_names}
    for condition in conditions:
        collector, _ = run_calibration(model, model_name, [condition], condition_bar=False)
        for name in measure_names:
            out[name].append([[np.nan if v is None else v for v in row] for row in collector.layer_means(name)])
    return {name: np.asarray(values, dtype=float) for name, values in out.items()}


def layer_spread(values: np.ndarray) -> np.ndarray:
    """values (conditions, layers, scales) -> per scale, std over layers of the mean over conditions."""
    return np.std(values.mean(axis=0), axis=0)


def lowest_layer_gap(values: np.ndarray) -> np.ndarray:
    """values (conditions, layers, scales) -> per scale, how far the layer with the lowest mean stands
    below the next lowest: one layer set apart from the rest, as a ScaleKV drafter is (NaN with one layer)."""
    ordered = np.sort(values.mean(axis=0), axis=0)
    return ordered[1] - ordered[0] if ordered.shape[0] > 1 else np.full(ordered.shape[1], np.nan)


STATISTICS = {"spread": layer_spread, "lowest-layer gap": lowest_layer_gap}


def bootstrap(statistic, values: np.ndarray, *, resamples: int = 2000, seed: int = 0,
              quantiles=(0.05, 0.95)) -> np.ndarray:
    """(len(quantiles), scales): quantiles of ``statistic`` over resamples of the conditions."""
    generator = np.random.default_rng(seed)
    count = values.shape[0]
    samples = np.stack([statistic(values[generator.integers(0, count, count)]) for _ in range(resamples)])
    return np.quantile(samples, quantiles, axis=0)


def compare(trained: np.ndarray, draws: Sequence[np.ndarray], *, statistic=layer_spread,
            resamples: int = 2000) -> dict:
    """Per scale: the statistic of the trained model, its bootstrap 5-95 % interval over conditions,
    the draws' median and max, and whether the interval's lower end is above every draw."""
    spread = statistic(trained)
    low, high = bootstrap(statistic, trained, resamples=resamples)
    untrained = np.stack([statistic(d) for d in draws])
    return {"trained": spread.tolist(), "trained_low": low.tolist(), "trained_high": high.tolist(),
            "untrained": untrained.tolist(), "untrained_median": np.median(untrained, axis=0).tolist(),
            "untrained_max": untrained.max(axis=0).tolist(),
            "beyond_untrained": (low > untrained.max(axis=0)).tolist()}


def untrained_kinds(family: str) -> dict[str, Callable[[int], dict]]:
    """{kind: seed -> transformer state dict} for the preset's transformer."""
    from adapters.tiny import train

    if family == "infinity":
        from adapters.infinity.config import TRAINED_TINY_CONFIG
        from adapters.infinity.model import InfinityTransformer
        from adapters.infinity.weights import random_init

        def random_weights(seed):
            return random_init(InfinityTransformer(TRAINED_TINY_CONFIG), seed).state_dict()

        return {"training init": lambda seed: train.initial_infinity_transformer(seed).state_dict(),
                "random init": random_weights}
    from adapters.var.config import TRAINED_TINY_VAR
    from adapters.var.model import VARTransformer
    from adapters.var.weights import init_random_var

    def random_var(seed):
        model = VARTransformer(TRAINED_TINY_VAR)
        init_random_var(model, seed)
        return model.state_dict()

    return {"training init": lambda seed: train.initial_var_transformer(seed).state_dict(),
            "random init": random_var}


def run(model_name: str, draws: int, resamples: int = 2000) -> dict:
    from adapters import load_model
    from benchmarks.calibrate import resolve_geometry
    from benchmarks.conditions import calibration_conditions

    family = "infinity" if model_name.startswith("infinity") else "var"
    model = load_model(model_name)
    transformer = model.transformer
    conditions = calibration_conditions(model_name)
    shipped = {k: v.clone() for k, v in transformer.state_dict().items()}
    trained = per_condition_means(model, model_name, conditions)
    untrained = {}
    for kind, make in untrained_kinds(family).items():
        untrained[kind] = []
        for seed in range(draws):
            transformer.load_state_dict(make(seed))
            untrained[kind].append(per_condition_means(model, model_name, conditions))
    transformer.load_state_dict(shipped)
    schedule = resolve_geometry(model_name, None, 1.0).schedule
    result = {"model": model_name, "conditions": [str(c) for c in conditions], "draws_per_kind": draws,
              "layers": int(trained[CURRENT].shape[1]), "scales": int(trained[CURRENT].shape[2]),
              "uniform_locality": [uniform_history_locality(schedule, k) if k else None
                                   for k in range(schedule.num_scales)],
              "layer_means": {m: [[None if np.isnan(v) else float(v) for v in row] for row in trained[m].mean(axis=0)]
                              for m in MEASURES}}
    everything = [d for kind in untrained.values() for d in kind]
    for measure in MEASURES:
        result[measure] = {}
        for label, statistic in STATISTICS.items():
            entry = {"all untrained": compare(trained[measure], [d[measure] for d in everything],
                                              statistic=statistic, resamples=resamples)}
            for kind, values in untrained.items():
                entry[kind] = compare(trained[measure], [d[measure] for d in values], statistic=statistic,
                                      resamples=resamples)
            result[measure][label] = entry
    return result


def markdown(results: Sequence[dict]) -> str:
    lines = []
    titles = {CURRENT: "current-map share", HISTORY_LOCALITY: "history locality (share within one cell)"}
    describe = {"spread": "spread over its {layers} layers (std)",
                "lowest-layer gap": "gap between its lowest and next-lowest layer"}
    for r in results:
        for measure in MEASURES:
            scales = range(1 if measure == CURRENT else 3, r["scales"])  # locality is 1 for all at scale 2
            for label in STATISTICS:
                both = r[measure][label]["all untrained"]
                lines += [f"**{r['model']}**: {describe[label].format(layers=r['layers'])} of the {titles[measure]}; "
                          f"{len(both['untrained'])} untrained draws ({r['draws_per_kind']} training init + "
                          f"{r['draws_per_kind']} random init) on the same {len(r['conditions'])} conditions", "",
                          "| | " + " | ".join(f"scale {k}" for k in scales) + " |", "|---|" + "---|" * len(scales)]
                lines += _rows(r[measure][label], scales)
    return "\n".join(lines)


def _rows(entry: dict, scales) -> list[str]:
    both = entry["all untrained"]
    lines = ["| trained [5-95 % over conditions] | " + " | ".join(
        f"{both['trained'][k]:.3f} [{both['trained_low'][k]:.3f}-{both['trained_high'][k]:.3f}]" for k in scales) + " |"]
    for kind in ("training init", "random init"):
        stats = entry[kind]
        lines.append(f"| {kind}: median / max | " + " | ".join(
            f"{stats['untrained_median'][k]:.3f} / {stats['untrained_max'][k]:.3f}" for k in scales) + " |")
    lines.append("| trained beyond every draw | " + " | ".join(
        "**yes**" if both["beyond_untrained"][k] else "no" for k in scales) + " |")
    return lines + [""]


def _no_nan(value):
    """NaN (a statistic with no value at a scale, e.g. history measures at scale 0) as JSON null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and np.isnan(value) else value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="infinity-tiny,var-tiny")
    parser.add_argument("--draws", type=int, default=16, help="untrained draws of each kind")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the conditions")
    parser.add_argument("--out", default=None, help="folder for selectivity_null.json / .md")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws {args.draws}: must be at least 1")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("infinity-tiny", "var-tiny"):
            parser.error(f"--models {m!r}: this compares the trained presets infinity-tiny and var-tiny only")
    torch.set_num_threads(1)
    results = [run(m, args.draws, args.resamples) for m in models]
    text = markdown(results)
    print(text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "selectivity_null.json").write_text(json.dumps(_no_nan(results), indent=1, allow_nan=False))
        (folder / "selectivity_null.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
