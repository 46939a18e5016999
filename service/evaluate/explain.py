"""Render one evaluation as an explanation page: CK over time, the probability ladder, screening, cards."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import jinja2

from service.evaluate import cards
from service.evaluate.pipeline import Evaluation
from service.facts.kinetics import episode_of, expected_value
from service.facts.labs import highest
from service.fhir import day

STYLESHEET_NAME = "explain.css"  # linked relatively, so it resolves beside the page (route or file)
STYLESHEET = resources.files(__package__).joinpath("page", STYLESHEET_NAME).read_text(encoding="utf-8")
PAGES = jinja2.Environment(
    loader=jinja2.PackageLoader(__package__, "page"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
STYLE = {
    "svg.hashsalt": "imnm-cds",  # the same page for the same input: no random ids in the SVG
    "svg.fonttype": "none",  # text stays text: a smaller SVG, drawn faster, sharp in print
    "font.size": 9,
}
MARGINS = {"left": 0.16, "right": 0.98}  # fixed: a constrained layout doubles the drawing time
DRAWN_CEILING = 1e7  # U/L; a larger value is an error in the record, drawn at the top of the axis
FVC_CEILING = 250.0  # % predicted; a larger value is an error in the record, drawn at this height
LISTED = 20  # past this many CK results, the alt text names the first, the peak and the latest
INDICATOR_MARK = {"critical": "‼ Critical", "warning": "! Warning", "info": "i Info"}


@dataclass(frozen=True)
class Chart:
    source: str  # a data: URL of the SVG
    alt: str


def render(k, evaluation: Evaluation, opened: str | None = None, read_at: datetime | None = None) -> str:
    """Render the explanation page of one evaluation; `opened` names the rule of the card it came from."""
    facts, outcome = evaluation.facts, evaluation.outcome
    read = f"{read_at:%Y-%m-%d %H:%M:%S} UTC" if read_at else None
    if facts is None or outcome is None:  # the deadline passed before the rules ran
        return PAGES.get_template("explain.html").render(
            evaluation=evaluation,
            stylesheet=STYLESHEET_NAME,
            incomplete=True,
            read=read,
            focus=None,
            missing=False,
        )
    # The cards' conclusions, as the cards were built: each standing for the ones it replaces.
    by_uuid = {
        str(cards.card_uuid(c, facts, evaluation.patient_id)): c
        for c in cards.folded(k, outcome.conclusions)
        if k.cards[c.key].topic in evaluation.topics
    }
    explained = [explain_card(k, card, by_uuid[card["uuid"]], facts) for card in evaluation.cards]
    focus = next((n for n, item in enumerate(explained, 1) if opened and opened in item["rules"]), None)
    suspicion = next((c for c in outcome.conclusions if "steps" in c.params), None)
    screening = next((c for c in outcome.conclusions if c.key == "cancer-screening"), None)
    return PAGES.get_template("explain.html").render(
        evaluation=evaluation,
        stylesheet=STYLESHEET_NAME,
        incomplete=False,
        when=day(evaluation.now),
        course=course_chart(k, facts),
        ladder=ladder(k, suspicion, facts) if suspicion else None,
        screening=screening_section(k, screening, facts),
        cards=explained,
        notes=facts.notes,
        read=read,
        focus=focus,
        missing=bool(opened) and focus is None,
    )


def write(k, evaluation: Evaluation, out: Path) -> None:
    """Write the page to a file, with its stylesheet beside it where the page links it."""
    out.write_text(render(k, evaluation), encoding="utf-8")
    out.with_name(STYLESHEET_NAME).write_text(STYLESHEET, encoding="utf-8")


def explain_card(k, card: dict, conclusion, facts) -> dict:
    """Gather what a card rests on: its rules, evidence, what is not known, and its sources."""
    text = k.cards[conclusion.key]
    basis = [facts.basis[i] for i in conclusion.basis]
    sources = cards.cited_sources(k, text.source, conclusion.params.get("cited", ()))
    return {
        "card": card,
        "mark": INDICATOR_MARK[card["indicator"]],
        "rules": conclusion.rules,
        "evidence": [b for b in basis if b.references],
        "unknown": [b.text for b in basis if not b.references],
        "sources": [
            {"source": source, "gives": values, "level": cards.CAUTION.get(source.verification, "verified")}
            for source, values in sources
        ],
        "suggestions": [s["label"] for s in card.get("suggestions", ())],
    }


def course_chart(k, facts) -> Chart | None:
    """Draw CK on a log scale over time with statin exposure, treatments, FVC and reports beneath it."""
    timeline = facts.timeline
    if not timeline.ck and not timeline.statins and not timeline.treatments:
        return None
    lanes = _lanes(k, timeline)
    rows = [3.2] + ([1.3] if timeline.fvc else []) + ([0.35 * len(lanes) + 0.5] if lanes else [])
    height = sum(rows) + 1.4
    figure = new_figure(9, height)
    figure.subplots_adjust(**MARGINS, top=1 - 0.75 / height, bottom=0.45 / height, hspace=0.35)
    axes = figure.subplots(len(rows), 1, sharex=True, gridspec_kw={"height_ratios": rows}, squeeze=False)[
        :, 0
    ]
    alt = ["CK over time on a log scale"]
    ck_axes = axes[0]
    if timeline.ck:
        alt += _draw_ck(k, ck_axes, timeline, facts)
    else:
        ck_axes.text(0.5, 0.5, "No CK result", transform=ck_axes.transAxes, ha="center")
        alt.append("no CK result")
    if timeline.fvc:
        fvc_axes = axes[1]
        times = [r.time for r in timeline.fvc]
        values = [min(r.value, FVC_CEILING) for r in timeline.fvc]
        fvc_axes.plot(times, values, marker="D", color="black", linestyle="-")
        for time, value in zip(times, values, strict=True):
            fvc_axes.annotate(f"{value:g}%", (time, value), textcoords="offset points", xytext=(0, 6))
        fvc_axes.set_ylabel("FVC\n% predicted")
        fvc_axes.set_ylim(0, max(110, max(values) + 15))
        fvc_axes.grid(True, alpha=0.3)
        readings = ", ".join(f"{r.value:g}% on {day(r.time)}" for r in timeline.fvc)
        alt.append(f"FVC % predicted: {readings}")
    if lanes:
        alt += _draw_lanes(axes[-1], lanes, facts.timeline, facts)
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter  # noqa: PLC0415 (see new_figure)

    axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(AutoDateLocator()))
    return Chart(svg(figure), "; ".join(alt) + ".")


def _draw_ck(k, axes, timeline, facts) -> list[str]:
    """Plot the observed CK, the normal range, the last statin dose and the expected toxic decay."""
    results = timeline.ck
    uln = drawn(max(r.uln for r in results))
    times = [r.time for r in results]
    framed = list(times)  # what the x axis frames, so a long exposure does not squeeze the curve
    values = [drawn(r.value) for r in results]
    axes.set_yscale("log")
    axes.axhspan(1, uln, facecolor="0.9", label=f"normal range (≤ ULN {uln:g} U/L)")
    axes.axhline(uln, color="0.4", linewidth=0.8)
    axes.plot(times, values, marker="o", color="black", label="CK measured (U/L)")
    labelled = results if len(results) <= 12 else [results[0], highest(results), results[-1]]
    for r in labelled:
        axes.annotate(f"{r.value:,.0f}", (r.time, drawn(r.value)), textcoords="offset points", xytext=(4, 6))
    listed = results if len(results) <= LISTED else [results[0], highest(results), results[-1]]
    described = "; ".join(f"{r.value:,.0f} U/L ({r.x_uln:.1f}× ULN) on {day(r.time)}" for r in listed)
    alt = [
        f"{len(results)} CK result{'s' if len(results) > 1 else ''}"
        + (" (first, peak and latest shown)" if len(listed) < len(results) else "")
        + f": {described}",
        f"upper limit of normal {uln:g} U/L shaded",
    ]
    last = timeline.last_statin
    if last is not None and last.last is not None:
        how = "recorded" if last.last_known else "inferred"
        axes.axvline(last.last, color="black", linestyle=":", label=f"last statin dose ({how})")
        alt.append(f"last statin dose {day(last.last)} ({how})")
        framed.append(last.last)
        episode = episode_of(k, last.last, list(results))
        if episode:
            peak = highest(episode)
            half_life = k.value("statin.ck-half-life")
            # Drawn until toxicity would have brought CK back to the upper limit of normal.
            end = peak.time + timedelta(days=half_life * math.log2(max(peak.x_uln, 1.0)))
            span = max((end - peak.time).total_seconds(), 1.0)
            curve = [peak.time + timedelta(seconds=span * i / 60) for i in range(61)]
            expected = [drawn(expected_value(peak, t, half_life)) for t in curve]
            axes.plot(
                curve,
                expected,
                linestyle="--",
                color="0.35",
                label=f"expected if toxic (half-life {half_life:g} d)",
            )
            alt.append(f"expected toxic decay from the peak with a half-life of {half_life:g} days")
            framed.append(end)
    fitted = _fact(facts, "ck-kinetics").get("observed_half_life")
    if fitted is not None:
        alt.append(f"observed half-life {fitted:.1f} days")
        axes.set_title(f"observed half-life {fitted:.1f} days", loc="right", fontsize=9, fontweight="bold")
    pad = max((max(framed) - min(framed)) * 0.08, timedelta(days=7))
    axes.set_xlim(min(framed) - pad, max(framed) + pad)
    axes.set_ylabel("CK (U/L, log)")
    axes.set_ylim(bottom=max(1, min([*values, uln]) / 3), top=max([*values, uln]) * 3)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1.12), ncols=2, fontsize=8, frameon=False)
    return alt


def drawn(value: float) -> float:
    """Keep a CK on the log axis: from 1 U/L to a ceiling no real CK reaches (labels keep the value)."""
    return min(max(value, 1.0), DRAWN_CEILING)


def _lanes(k, timeline) -> list[tuple[str, list]]:
    """Name one lane per drug class: statins first, then each treatment class."""
    lanes = [("statin", list(timeline.statins))] if timeline.statins else []
    classes: dict[str, list] = {}
    for name, course in timeline.treatments:
        classes.setdefault(name, []).append(course)
    lanes += [(k.text(f"labels.concepts.{name}"), found) for name, found in sorted(classes.items())]
    if timeline.markers:
        lanes.append(("reports", []))
    return lanes


def _draw_lanes(axes, lanes, timeline, facts) -> list[str]:
    """Draw statin and treatment courses as bars (hatched where the end is inferred), reports as marks."""
    alt = []
    now = max([c.last for _, cs in lanes for c in cs if c.last] + [r.time for r in timeline.ck], default=None)
    for row, (name, courses) in enumerate(lanes):
        spans = []
        for c in courses:
            start = c.start or c.last
            end = c.last if not c.current else max(now or c.last or start, c.last or start)
            if start is None or end is None:
                continue
            width = max(end - start, timedelta(days=1))
            axes.barh(
                row,
                width,
                left=start,
                height=0.6,
                color="0.55" if c.last_known else "white",
                edgecolor="black",
                hatch=None if c.last_known else "///",
            )
            spans.append(f"{day(start)} to {day(end)} ({'end recorded' if c.last_known else 'end inferred'})")
        if spans:
            alt.append(f"{name}: " + ", ".join(spans))
    if timeline.markers:
        row = len(lanes) - 1
        for marker in timeline.markers:
            if marker.time is None:
                continue
            symbol = "^" if marker.kind == "biopsy" else "s"
            axes.plot([marker.time], [row], marker=symbol, color="black", markersize=8)
            axes.annotate(marker.kind, (marker.time, row), textcoords="offset points", xytext=(6, -3))
            alt.append(f"{marker.kind} {day(marker.time)}: {marker.reading}")
    axes.set_yticks(range(len(lanes)), [name for name, _ in lanes])
    axes.set_ylim(len(lanes) - 0.4, -0.6)
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_title(
        "solid: end recorded · hatched: end inferred · ▲ biopsy · ■ screening", fontsize=8, loc="left"
    )
    return alt


def ladder(k, conclusion, facts) -> dict:
    """Lay out the probability ladder: pre-test, each result with its likelihood ratio, post-test."""
    params = conclusion.params
    steps = params["steps"]
    labels = ["pre-test"] + [s.evidence for s in steps]
    values = [params["pretest"]] + [s.probability for s in steps]
    height = 0.45 * len(labels) + 0.8
    figure = new_figure(9, height)
    figure.subplots_adjust(left=0.3, right=0.98, top=1 - 0.15 / height, bottom=0.5 / height)
    axes = figure.subplots()
    bars = axes.barh(range(len(labels)), [v * 100 for v in values], color="white", edgecolor="black")
    bars[0].set_hatch("//")
    if steps:
        bars[-1].set_facecolor("0.6")
    for row, (value, step) in enumerate(zip(values, [None, *steps], strict=True)):
        text = cards.percent(value) + (f"   (LR {step.likelihood_ratio:.3g})" if step else "")
        axes.annotate(text, (value * 100, row), textcoords="offset points", xytext=(4, -3))
    axes.set_yticks(range(len(labels)), labels)
    axes.set_ylim(len(labels) - 0.5, -0.5)
    axes.set_xlim(0, 100)
    axes.set_xlabel("probability of IMNM (%)")
    axes.grid(True, axis="x", alpha=0.3)
    alt = f"Probability of IMNM: pre-test {cards.percent(params['pretest'])} ({params['presentation']})"
    alt += "".join(
        f"; {s.evidence}, likelihood ratio {s.likelihood_ratio:.3g}, → {cards.percent(s.probability)}"
        for s in steps
    )
    alt += (
        f"; post-test {cards.percent(params['probability'])}." if steps else "; no result to update it yet."
    )
    unknown = [facts.basis[i].text for i in conclusion.basis if not facts.basis[i].references]
    return {
        "chart": Chart(svg(figure), alt),
        "pretest": cards.percent(params["pretest"]),
        "presentation": params["presentation"],
        "steps": [(s.evidence, f"{s.likelihood_ratio:.3g}", cards.percent(s.probability)) for s in steps],
        "posttest": cards.percent(params["probability"]),
        "unknown": unknown,
    }


def screening_section(k, conclusion, facts) -> dict | None:
    """Say when the myositis began, the screening window around it, the tier and the panels."""
    onset = _fact(facts, "myositis-onset")
    if not onset.get("known") and conclusion is None:
        return None
    window = k.value("cancer.window")
    section = {"onset": None, "tier": None, "factors": [], "due": []}
    if onset.get("known"):
        began = datetime.fromisoformat(onset["onset_on"])
        section["onset"] = {
            "on": onset["onset_on"],
            "source": onset["source"],
            "from": day(began - timedelta(days=window)),
            "to": day(began + timedelta(days=window)),
            "years": window / 365.25,
        }
    screened = _fact(facts, "cancer-screening")
    section["done"] = [
        (f"{m.reading}", day(m.time) if m.time else "undated", m.reference)
        for m in facts.timeline.markers
        if m.kind == "screening"
    ]
    section["unknown"] = "unknown" in screened.values()
    if conclusion is not None:
        params = conclusion.params
        section["tier"] = params["tier_label"]
        section["factors"] = params["reasons"]
        suggested = k.cards[conclusion.key].suggestions
        section["due"] = [order.label for order in suggested if order.key in params["orders"]]
    return section


def _fact(facts, id_: str) -> dict:
    return next((f for f in facts.facts if f["id"] == id_), {})


def new_figure(width: float, height: float):
    """Start a figure of this size in inches, in the page's style."""
    # matplotlib is imported on the first chart: a worker that never draws one starts without it.
    import matplotlib  # noqa: PLC0415 (imported when first needed)
    from matplotlib.figure import Figure  # noqa: PLC0415

    matplotlib.rcParams.update(STYLE)
    return Figure(figsize=(width, height))


def svg(figure) -> str:
    """Return a figure as a data: URL of its SVG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
