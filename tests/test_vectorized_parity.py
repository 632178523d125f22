"""``python -m transfer_lab.vectorized.parity``: the acceptance rule of a vectorised sweep against
the same sweep cell by cell (means within 0.01, every cell within 0.03, every cell paired)."""

from __future__ import annotations

import pytest

from transfer_lab.vectorized import parity


def run(monkeypatch, capsys, vec, sep, bad=0):
    sides = {"v": (vec, bad), "s": (sep, 0)}
    monkeypatch.setattr(parity, "cells", lambda root, metric: sides[root])
    code = parity.main(["v", "s"])
    return code, capsys.readouterr().out


def test_equal_sweeps_pass_and_the_table_has_one_row_per_strategy(monkeypatch, capsys):
    vec = {("scratch", 0): 0.5, ("scratch", 1): 0.7, ("finetune", 0): 0.9, ("finetune", 1): 0.8}
    sep = {k: v + 0.005 for k, v in vec.items()}
    code, out = run(monkeypatch, capsys, vec, sep)
    assert code == 0 and "| finetune | 2 | 0.8500 ± 0.0707 | 0.8550 ± 0.0707 | -0.0050 | 0.0050 |" in out
    assert out.count("| scratch | 2 |") == 1


@pytest.mark.parametrize(("shift", "bad", "drop"), [
    ({("scratch", 0): 0.04}, 0, False),                       # one cell off by more than 0.03
    ({("scratch", 0): 0.025, ("scratch", 1): 0.025}, 0, False),  # the mean off by more than 0.01
    ({}, 1, False),                                            # a failed cell
    ({}, 0, True),                                             # an unpaired cell
])
def test_each_rule_fails_on_its_own(monkeypatch, capsys, shift, bad, drop):
    vec = {("scratch", 0): 0.5, ("scratch", 1): 0.7}
    sep = {k: v + shift.get(k, 0.0) for k, v in vec.items()}
    if drop:
        del sep[("scratch", 1)]
    code, out = run(monkeypatch, capsys, vec, sep, bad)
    assert code == 1 and out.rstrip().endswith("NO")
