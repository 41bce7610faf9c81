"""Ablation table: assembled from demo summary files, counts and errors in the right columns."""
from __future__ import annotations

import json

from vpr_localizer.evaluation.report import ABLATION_COLUMNS, ablation_table, main


def _recall(c1, c5, total):
    return {"x": {"at": {"1": {"correct": c1, "total": total}, "5": {"correct": c5, "total": total},
                         "10": {"correct": total, "total": total}}}}


def _summary(g1, nord1, err_mean, ms):
    place = lambda c, t: {"methods": {"NetVLAD": {"recall": _recall(c, t, t)}},  # noqa: E731
                          "encoder": {"encode_ms_per_image": ms}}
    return {
        "gardens_day_vs_night": place(g1, 12),
        "gardens_night_vs_day": place(4, 6),
        "trail_dry_vs_snow": place(3, 7),
        "nordland_heldout_winter_vs_summer": {"methods": {"NetVLAD": {"recall": _recall(nord1, 150, 976)}},
                                              "encoder": {"encode_ms_per_image": 50.0}},
        "lund_odd_vs_even": {"methods": {"NetVLAD": {
            "recall": _recall(15, 15, 15),
            "localization": {"mean_error_m": err_mean, "median_error_m": 4.25,
                             "within_m": {"3": {"correct": 4, "total": 15}, "25": {"correct": 15, "total": 15}}}}},
            "encoder": {"encode_ms_per_image": 900.0}},
    }


def test_ablation_table_rows_and_cells(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_summary(11, 62, 5.61, 1185.4)))
    summ_b = _summary(12, 70, 6.0, 2400.0)
    del summ_b["trail_dry_vs_snow"]
    b.write_text(json.dumps(summ_b))
    lines = ablation_table([("plain", str(a)), ("+ mask", str(b))]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(ABLATION_COLUMNS) + 2
    row_a = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row_a == ["plain", "11/12", "4/6", "3/7", "62/976 / 150/976", "5.6 / 4.2, 4/15", "1185 / 50"]
    row_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row_b[0] == "+ mask" and row_b[1] == "12/12" and row_b[3] == "-"  # missing scenario
    assert row_b[4] == "70/976 / 150/976" and row_b[5].startswith("6.0 / 4.2")


def test_report_main_usage(tmp_path, capsys):
    assert main([]) == 2
    p = tmp_path / "s.json"
    p.write_text(json.dumps(_summary(11, 62, 5.6, 1000.0)))
    assert main([f"row one={p}"]) == 0
    assert "| row one | 11/12 |" in capsys.readouterr().out
