"""Markdown results table for the demo (the README's results table is pasted from it)."""
from __future__ import annotations

from typing import Dict

from .evaluate import RECALL_NS


def _cell(r: Dict, n: int) -> str:
    a = r["at"].get(n) or r["at"].get(str(n))
    return f"{a['correct']}/{a['total']}"


def results_table(all_metrics: Dict[str, Dict]) -> str:
    """One row per (scenario, method): recall@1/5/10 with counts, errors, encode time.

    Args:
        all_metrics: scenario name -> metrics dict from :func:`vpr_localizer.evaluate.evaluate`.
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
