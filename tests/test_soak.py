"""A short soak (bench/soak.py): gunicorn under concurrent clients, every answer checked, no worker lost."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_a_short_soak_has_no_server_error_wrong_answer_or_crash():
    # Worker memory over a run this short is noise: the growth bound is for long runs of bench/soak.py.
    command = [sys.executable, "bench/soak.py", "--requests", "1000", "--clients", "4", "--json"]
    command += ["--rss-growth-mib", "1000000", "--no-save"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    figures = json.loads(result.stdout)
    assert figures["failures"] == [], figures
    assert figures["requests"] == 1000 and figures["serverErrors"] == 0 and figures["wrongAnswers"] == 0
    assert figures["workersUnchanged"] and figures["workerExits"] == 0
    assert figures["feedbackInDatabase"] == figures["feedbackAcknowledged"] > 0
    assert set(figures["statuses"]) >= {"200", "400", "404", "405", "406", "412", "415"}
