"""Efficacy where a detail decides: the detail world (tools/detail_world.py), 10% of its labels flipped, end to
end through tools/demo.py as tests/test_alignment.py runs the toy world.

A long check (its own reference, trained SFT_STEPS steps, and two DPO runs: several minutes on 2 CPU cores,
over the suite's time budget): DPO_DS_EFFICACY=1 runs it; `make test` reports it skipped with that reason.
Not passing yet: a reference of 600 steps put 75% of its samples on the manifold (the patch faded on the rest),
and 600 more steps with a decaying rate 89%, below the bar's 95% (README, "Does it work?", and "Not done yet").
"""

from __future__ import annotations

import os

import pytest

from test_alignment import _demo, _passes_the_bar

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("DPO_DS_EFFICACY"),
                                 reason="a long efficacy run (the detail world's own reference and two DPO runs, "
                                        "minutes on 2 CPU cores); DPO_DS_EFFICACY=1 runs it")]

SFT_STEPS = "600"  # the detail world's reference needs more than the toy's 300 to draw the detail (README)
DETAIL = ["--world", "detail", "--agreement", "0.9", "--sft-steps", SFT_STEPS, "--live-steps", "0",
          "--checkpoint-every", "40"]


NOT_YET = pytest.mark.xfail(reason="not reached yet: the reference put 89% of its samples on the manifold after 1200 "
                                   "steps, and dpo+sft moved the rate by +0.025 with 83% on it (README)")


@pytest.fixture(scope="module")
def detail_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("detail_a")
    result, _ = _demo(out, *DETAIL)
    return out, result


@NOT_YET
def test_a_preferred_detail_moves_samples_and_keeps_them_on_the_manifold(detail_a):
    _, result = detail_a
    assert result["on_manifold"]["reference"] >= 0.95, result
    _passes_the_bar(result)


@NOT_YET
def test_the_reversed_detail_moves_the_other_way(detail_a, tmp_path):
    out_a, _ = detail_a
    result, _ = _demo(tmp_path, *DETAIL, "--prefer", "B", "--reference", str(out_a / "reference"))
    _passes_the_bar(result)
