"""Alert budget: warning-or-critical cards per patient-view over the committed fixture scenarios.

Usage: PYTHONPATH=. .venv/bin/python bench/alert_budget.py

Each patient-view scenario under fhir_fixtures/ is evaluated by the app in-process (no network), and
its warning and critical cards are counted. Reports the mean, the most, and the scenarios over the
budget (more than 2 such cards). Results go to bench/results/alert-budget-<date>.json.
"""

from __future__ import annotations

import json
import statistics

from common import ROOT, environment, save
from service.cli import scenario_target
from service.web.app import create_app

BUDGET = 2  # warning-or-critical cards per patient-view (clinical review, "Alert fatigue")


def main() -> None:
    client = create_app({"log_level": "WARNING"}).test_client()
    counts: dict[str, int] = {}
    for path in sorted((ROOT / "fhir_fixtures").glob("*/request.json")):
        request = json.loads(path.read_text(encoding="utf-8"))
        if request.get("hook") != "patient-view":
            continue
        response = client.post(scenario_target(request, ""), json=request)
        cards = response.get_json().get("cards", []) if response.status_code == 200 else []
        counts[path.parent.name] = sum(c["indicator"] in ("warning", "critical") for c in cards)
    values = list(counts.values())
    results = {
        "environment": environment(),
        "patientViews": len(values),
        "mean": round(statistics.mean(values), 2),
        "max": max(values),
        "overBudget": {name: n for name, n in counts.items() if n > BUDGET},
        "perScenario": counts,
    }
    print(
        f"patient-views: {len(values)}; warning-or-critical cards per view: mean {results['mean']}, "
        f"max {results['max']}; over the budget of {BUDGET}: {results['overBudget'] or 'none'}"
    )
    print(f"saved {save('alert-budget', results)}")


if __name__ == "__main__":
    main()
