"""`kvpolicy generate` from a newcomer's point of view: the key-cache layout it runs with (issue 16,
item 13), where its files go (item 3) and checks that come before any work (item 6)."""

from __future__ import annotations

import pytest

from benchmarks.cli import main


def test_generate_bf16_key_cache_is_an_explicit_option(tmp_path, capsys, monkeypatch):
    import adapters

    seen = {}
    real = adapters.load_model

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(adapters, "load_model", spy)
    assert main(["generate", "--model", "infinity-tiny", "--prompt", "a red cube", "--key-dtype", "bf16",
                 "--dtype", "bf16", "--out", str(tmp_path / "a.png")]) == 0
    assert str(seen["key_dtype"]) == "torch.bfloat16"


def test_var_refuses_a_key_dtype_other_than_its_compute_dtype_before_loading(tmp_path, capsys, monkeypatch):
    import adapters

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["generate", "--model", "var-tiny", "--label", "1", "--key-dtype", "bf16", "--out",
                 str(tmp_path / "a.png")])
    assert code == 2
    assert capsys.readouterr().err == ("kvpolicy generate: error: --key-dtype bf16: var-tiny caches keys in its "
                                       "compute dtype (fp32); use --dtype bf16 instead\n")
    assert not list(tmp_path.iterdir())
