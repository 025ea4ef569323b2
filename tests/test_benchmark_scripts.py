"""The benchmark scripts the README's tables come from still run against the library as it is (a review found
``benchmarks/tradeoff.py`` crashing after a library signature change), on the real model with tiny settings, and
their arithmetic holds: each drop is ``(base - score) / base`` of the scores they record."""

from __future__ import annotations

import json

import pytest

from benchmarks import tradeoff


@pytest.mark.usefixtures("smollm2")
def test_tradeoff_runs_and_its_drops_are_relative_to_the_bare_model(tmp_path, shared_data):
    out = tmp_path / "tradeoff.json"
    args = ["--data-dir", str(shared_data), "--n-probe", "2", "--n-eval", "1", "--ratios", "0.1"]
    result = tradeoff.main([*args, "--variants", "NA,SP answer tokens", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert set(result["variants"]) == {"NA", "SP answer tokens"}
    base = result["base"]
    for rows in result["variants"].values():
        assert [r["ratio"] for r in rows] == [0.1]
        for skill in ("gsm8k", "mbpp"):
            expected = (base[skill] - rows[0]["scores"][skill]) / base[skill]
            assert rows[0][f"{skill}_drop"] == pytest.approx(expected, abs=1e-12)
