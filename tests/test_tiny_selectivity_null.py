"""scripts/tiny_selectivity_null.py: the statistics that compare a trained model's per-layer attention
selectivity with untrained draws of the same transformer (issue 17)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "tiny_selectivity_null", Path(__file__).resolve().parents[1] / "scripts" / "tiny_selectivity_null.py")
null = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(null)


def test_spread_and_lowest_layer_gap_on_known_values():
    # 2 conditions, 3 layers, 2 scales; layer means: scale 0 (0.2, 0.5, 0.9), scale 1 (0.4, 0.4, 0.7)
    values = np.array([[[0.1, 0.3], [0.5, 0.5], [0.8, 0.7]],
                       [[0.3, 0.5], [0.5, 0.3], [1.0, 0.7]]])
    assert null.layer_spread(values) == pytest.approx([np.std([0.2, 0.5, 0.9]), np.std([0.4, 0.4, 0.7])])
    assert null.lowest_layer_gap(values) == pytest.approx([0.3, 0.0])


def test_bootstrap_of_identical_conditions_is_the_value_and_compare_flags_only_clear_excess():
    one = np.array([[0.1, 0.5], [0.9, 0.5]])  # layers x scales
    trained = np.stack([one] * 5)
    low, high = null.bootstrap(null.layer_spread, trained, resamples=50)
    assert low == pytest.approx([0.4, 0.0]) and high == pytest.approx([0.4, 0.0])
    draws = [np.stack([np.array([[0.3, 0.4], [0.7, 0.6]])] * 5), np.stack([np.array([[0.45, 0.5], [0.55, 0.5]])] * 5)]
    result = null.compare(trained, draws, resamples=50)
    assert result["untrained_max"] == pytest.approx([0.2, 0.1])
    assert result["beyond_untrained"] == [True, False]  # 0.4 > 0.2; 0.0 is not above 0.1


def test_training_init_draws_are_where_training_starts_and_differ_by_seed(monkeypatch):
    from adapters.tiny import train

    started = {}

    def record(stage, seed, settings, offset, transformer, *rest, **kwargs):
        started.setdefault(stage, {k: v.clone() for k, v in transformer.state_dict().items()})

    monkeypatch.setattr(train, "infinity_cycle", record)
    monkeypatch.setattr(train, "var_cycle", record)
    settings = train.StageSettings(steps=1, batch=2, lr=1e-3)
    train.train_infinity(3, settings, encoder=None, log=train.TrainingLog(), progress=False)
    train.train_var(3, settings, encoder=None, vqvae=None, log=train.TrainingLog(), progress=False)
    kinds = {family: null.untrained_kinds(family) for family in ("infinity", "var")}
    for family, stage in (("infinity", "infinity"), ("var", "var")):
        drawn = kinds[family]["training init"](3)
        assert drawn.keys() == started[stage].keys()
        assert all(torch.equal(drawn[k], started[stage][k]) for k in drawn)
        for kind in ("training init", "random init"):
            a, b, c = kinds[family][kind](0), kinds[family][kind](0), kinds[family][kind](1)
            assert all(torch.equal(a[k], b[k]) for k in a)
            assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_a_run_on_var_tiny_compares_like_for_like(tmp_path):
    assert null.main(["--models", "var-tiny", "--draws", "1", "--resamples", "20", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "selectivity_null.md").read_text()
    assert "2 untrained draws (1 training init + 1 random init) on the same 10 conditions" in text
    import json

    (result,) = json.loads((tmp_path / "selectivity_null.json").read_text())
    entry = result["current_ratio"]["spread"]
    # the trained model's own spread matches its calibration means over layers
    means = np.array([[np.nan if v is None else v for v in row] for row in result["layer_means"]["current_ratio"]])
    assert entry["all untrained"]["trained"][1:] == pytest.approx(np.std(means[:, 1:], axis=0).tolist())
    assert len(entry["all untrained"]["untrained"]) == 2


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        null.main(["--draws", "0"])
    assert "--draws 0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        null.main(["--models", "var-tiny-random"])
    assert "infinity-tiny and var-tiny only" in capsys.readouterr().err
