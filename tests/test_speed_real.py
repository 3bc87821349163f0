"""benchmarks/speed_real.py's summary: ratios against the same round's full run, medians."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import speed_real  # noqa: E402


def _m(samples: float, recluster: float = 0.0) -> dict:
    return {"train_samples_per_s": samples, "recluster_seconds": recluster}


def test_ratios_pair_each_round_with_its_own_full_run() -> None:
    cells = {
        "full": {"0": _m(100.0), "1": _m(50.0), "2": _m(80.0)},
        # Round 1 ran under heavy load for both: its ratio is still 1.2, as in round 0.
        "cce@1/16": {"0": _m(120.0, 2.0), "1": _m(60.0, 4.0), "2": _m(40.0, 3.0)},
        "qr_mult@1/16": {"0": _m(90.0), "1": {"error": "ValueError: boom"}, "2": _m(80.0)},
    }
    rows = speed_real.summarize(cells, 3)
    assert rows["full"]["ratio_to_full"] == 1.0
    assert rows["cce@1/16"]["ratios"] == [1.2, 1.2, 0.5]
    assert rows["cce@1/16"]["ratio_to_full"] == 1.2  # median of the per-round ratios
    assert rows["cce@1/16"]["samples_per_s"] == 60.0
    assert rows["cce@1/16"]["recluster_seconds"] == 3.0
    assert rows["qr_mult@1/16"]["rounds"] == 2
    assert rows["qr_mult@1/16"]["ratio_to_full"] == 0.95  # (0.9 + 1.0) / 2
    assert rows["qr_mult@1/16"]["errors"] == ["ValueError: boom"]


def test_a_method_without_a_full_run_has_no_ratio() -> None:
    rows = speed_real.summarize({"cce@1/16": {"0": _m(10.0)}}, 1)
    assert rows["cce@1/16"]["ratio_to_full"] is None and rows["cce@1/16"]["samples_per_s"] == 10.0
