"""Markdown results table for the demo (the README's results table is pasted from it)."""
from __future__ import annotations

from typing import Dict

from vpr_localizer.evaluation.evaluate import RECALL_NS


def _cell(r: Dict, n: int) -> str:
    a = r["at"].get(n) or r["at"].get(str(n))
    return f"{a['correct']}/{a['total']}"


def results_table(all_metrics: Dict[str, Dict]) -> str:
    """One row per (scenario, method): recall@1/5/10 with counts, errors, encode time.

    Args:
        all_metrics: scenario name -> metrics dict from :func:`vpr_localizer.evaluation.evaluate.evaluate`.
    """
    head = ("| scenario | method | criterion | R@1 | R@5 | R@10 | mean / median error (m) | within 3 m | "
            "within 25 m | encode ms/img (input) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for sname, m in all_metrics.items():
        size = m["encoder"]["config"]["image_size"]
        ms = f"{m['encoder']['encode_ms_per_image']:.0f} ({size[0]}x{size[1]})"
        for mname, e in m["methods"].items():
            for lab, r in e["recall"].items():
                loc = e.get("localization")
                err = f"{loc['mean_error_m']:.1f} / {loc['median_error_m']:.1f}" if loc else "-"
                w3 = f"{loc['within_m']['3']['correct']}/{loc['within_m']['3']['total']}" if loc and "3" in loc["within_m"] else "-"
                w25 = f"{loc['within_m']['25']['correct']}/{loc['within_m']['25']['total']}" if loc and "25" in loc["within_m"] else "-"
                cells = [sname, mname, lab] + [_cell(r, n) for n in RECALL_NS] + [err, w3, w25, ms]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Columns of the ablation table: (header, scenario, what).
ABLATION_COLUMNS = (
    ("Gardens day→night map R@1", "gardens_day_vs_night", "r1"),
    ("Gardens night→day map R@1", "gardens_night_vs_day", "r1"),
    ("trail dry→snow map R@1", "trail_dry_vs_snow", "r1"),
    ("Nordland held-out winter→summer R@1 / R@5", "nordland_heldout_winter_vs_summer", "r1r5"),
    ("Lund error mean / median (m), within 3 m", "lund_odd_vs_even", "err"),
    ("encode ms/img 640x360 / 128x64", None, "ms"),
)


def _r1(m: Dict, n: int = 1) -> str:
    r = next(iter(m["methods"]["NetVLAD"]["recall"].values()))
    return _cell(r, n)


def ablation_table(rows) -> str:
    """Markdown ablation table (the seed's Table 3 shape) from ``demo`` summary files.

    Args:
        rows: ``(label, summary.json path)`` pairs, one per ablation row (each written by one
            ``vpr-localizer demo --no-ros ...`` command).

    Returns:
        Markdown; a scenario missing from a row's summary shows ``-``.
    """
    import json

    head = "| row | " + " | ".join(h for h, _, _ in ABLATION_COLUMNS) + " |"
    lines = [head, "|" + "|".join(["---"] * (len(ABLATION_COLUMNS) + 1)) + "|"]
    for label, path in rows:
        with open(path) as fh:
            summ = json.load(fh)
        cells = []
        for _, sc, what in ABLATION_COLUMNS:
            if what == "ms":
                g, n = summ.get("gardens_day_vs_night"), summ.get("nordland_heldout_winter_vs_summer")
                cells.append(f"{g['encoder']['encode_ms_per_image']:.0f} / {n['encoder']['encode_ms_per_image']:.0f}"
                             if g and n else "-")
                continue
            m = summ.get(sc)
            if m is None:
                cells.append("-")
            elif what == "r1":
                cells.append(_r1(m))
            elif what == "r1r5":
                cells.append(f"{_r1(m)} / {_r1(m, 5)}")
            else:
                loc = m["methods"]["NetVLAD"]["localization"]
                w3 = loc["within_m"]["3"]
                cells.append(f"{loc['mean_error_m']:.1f} / {loc['median_error_m']:.1f}, {w3['correct']}/{w3['total']}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m vpr_localizer.evaluation.report LABEL=SUMMARY.json ...``: print the ablation table."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m vpr_localizer.evaluation.report LABEL=path/to/summary.json ...", file=sys.stderr)
        return 2
    print(ablation_table([a.split("=", 1) for a in args]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
