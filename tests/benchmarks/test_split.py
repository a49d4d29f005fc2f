"""benchmarks.split: a real measurement on a small NIH-form table, and what its summary decides."""
from __future__ import annotations

import csv

import numpy as np

from benchmarks.split import measure, summarise


def test_measures_a_table_and_reports_each_finding(tmp_path):
    rng = np.random.default_rng(0)
    findings = ["Effusion", "Hernia", "Infiltration"]
    table = tmp_path / "Data_Entry_2017.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Labels", "Patient ID", "View Position"])
        for i in range(3000):
            chosen = [f for f, p in zip(findings, (0.4, 0.05, 0.5)) if rng.random() < p]
            writer.writerow([f"{i:08d}.png", "|".join(chosen) or "No Finding", i // 3, "PA"])
    results = measure(table, seeds=2, val=0.1, test=0.1)
    assert results["rows"] == 3000 and results["patients"] == 1000 and results["labels"] == findings
    checks, markdown = summarise(results)
    status = {c["name"]: c["status"] for c in checks}
    assert status["patients in more than one split (every seed)"] == "met"
    assert all(run["leaking_patients"] == 0 for run in results["runs"])
    assert "| Hernia |" in markdown and "per-patient" in markdown
    # a planted deviation is reported as NOT MET
    results["runs"][0]["deviation"]["val"][0] = 0.5
    assert {c["name"]: c["status"] for c in summarise(results)[0]}[
        "worst relative prevalence deviation, labels with >= 1000 positives"] == "NOT MET"
