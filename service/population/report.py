"""Write a population screen's report.html: cards per topic, cancer risk tiers, distributions, who first."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import jinja2

from service.evaluate import explain
from service.evaluate.cards import PROBABILITY, RISK_TIER, SEVERITY, percent

REPORT = "report.html"
FIRST = 50  # patients listed to review first
CK_BINS = ((0, 1, "≤ 1×"), (1, 3, "1-3×"), (3, 10, "3-10×"), (10, 50, "10-50×"), (50, float("inf"), "> 50×"))
PAGES = jinja2.Environment(
    loader=jinja2.PackageLoader(__package__, "page"), autoescape=True, undefined=jinja2.StrictUndefined
)


def write(results: Iterable[Path], summary, out: Path) -> Path:
    """Write OUT/report.html (and its stylesheet) from the result lines and the summary."""
    rows = list(_rows(results))
    tiers = Counter(r["tier"] for r in rows if r["tier"])
    peaks = [r["peak"] for r in rows if r["peak"] is not None]
    probabilities = [r["probability"] for r in rows if r["probability"] is not None]
    ck_counts = [sum(low < p <= high if low else p <= high for p in peaks) for low, high, _ in CK_BINS]
    probability_counts = [
        sum(i / 10 <= p < (i + 1) / 10 or (i == 9 and p == 1) for p in probabilities) for i in range(10)
    ]
    ranked = sorted(
        (r for r in rows if r["indicator"]),
        key=lambda r: (SEVERITY[r["indicator"]], -(r["probability"] or 0), r["patient"]),
    )
    html = PAGES.get_template("report.html").render(
        summary=summary,
        indicators=list(SEVERITY),
        topics=sorted({topic for topic, _ in summary.cards}),
        tiers=[(tier, tiers[tier]) for tier in ("high", "moderate", "standard")],
        ck_chart=_bars(
            [label for *_, label in CK_BINS],
            ck_counts,
            "peak CK (× upper limit of normal)",
            f"Peak CK × ULN across {len(peaks)} patients with a CK result: "
            + ", ".join(f"{label} {n}" for (*_, label), n in zip(CK_BINS, ck_counts, strict=True))
            + ".",
        ),
        probability_chart=_bars(
            [f"{i * 10}-{i * 10 + 10}%" for i in range(10)],
            probability_counts,
            "probability of IMNM",
            f"Probability of IMNM across {len(probabilities)} patients with an IMNM card: "
            + ", ".join(f"{i * 10}-{i * 10 + 10}% {n}" for i, n in enumerate(probability_counts))
            + ".",
        ),
        first=[
            {**r, "probability": percent(r["probability"]) if r["probability"] is not None else "—"}
            for r in ranked[:FIRST]
        ],
        listed=min(FIRST, len(ranked)),
        ranked=len(ranked),
    )
    (out / REPORT).write_text(html, encoding="utf-8")
    (out / explain.STYLESHEET_NAME).write_text(explain.STYLESHEET, encoding="utf-8")
    return out / REPORT


def _rows(results: Iterable[Path]):
    """Read each patient's result: most severe indicator, topics, probability, tier, peak CK × ULN."""
    for path in results:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                result = json.loads(line)
                cards = result.get("cards", [])
                extensions = [c.get("extension", {}) for c in cards]
                yield {
                    "patient": result["patient"],
                    "indicator": min((c["indicator"] for c in cards), key=SEVERITY.get, default=None),
                    "topics": sorted({c["source"]["topic"]["code"] for c in cards}),
                    "probability": next((e[PROBABILITY] for e in extensions if PROBABILITY in e), None),
                    "tier": next((e[RISK_TIER] for e in extensions if RISK_TIER in e), None),
                    "peak": result.get("peakCkXUln"),
                }


def _bars(labels: list[str], counts: list[int], axis: str, alt: str) -> explain.Chart:
    """Draw counts as labelled bars."""
    figure = explain.new_figure(7, 2.6)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.22)
    axes = figure.subplots()
    bars = axes.bar(range(len(labels)), counts, color="0.7", edgecolor="black")
    axes.bar_label(bars, labels=[str(n) for n in counts])
    axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel(axis)
    axes.set_ylabel("patients")
    axes.set_ylim(0, max([*counts, 1]) * 1.2)
    axes.locator_params(axis="y", integer=True)
    return explain.Chart(explain.svg(figure), alt)
