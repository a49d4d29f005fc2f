"""python -m benchmarks: one report from several suites; a failing suite is reported while the others complete."""
from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import PYTHON, REPO
from tests.training_fixtures import quiet


def test_a_failing_suite_is_reported_and_the_others_complete(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, CXR_SHARED_DATA=str(tmp_path / "no-data-here"), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([PYTHON, "-m", "benchmarks", "--suite", "preprocess,scaling", "--quick", "--out", str(out),
                             "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 1, quiet(result.stderr)
    assert "FAILED suites: preprocess" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["suites"]["preprocess"]["status"] == "failed"
    assert "no-data-here" in results["suites"]["preprocess"]["error"]
    scaling = results["suites"]["scaling"]
    assert scaling["status"] == "ok" and scaling["checks"]
    report = (out / "report.md").read_text()
    assert "## Suite: preprocess: FAILED" in report and "## Summary: VGG16 vs ResNet50" in report
    for check in scaling["checks"]:  # the report's numbers are the JSON's
        assert f"scaling: {check['name']} | {check['measured']:.3f} | {check['goal']} | {check['status']}" in report
    for png in scaling["plots"]:
        assert (out / png).stat().st_size > 5_000 and f"]({png})" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(scaling["plots"]) and 'src="http' not in page


def test_help_and_unknown_suite():
    result = subprocess.run([PYTHON, "-m", "benchmarks", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "--suite" in result.stdout
    bad = subprocess.run([PYTHON, "-m", "benchmarks", "--suite", "gpu"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown gpu" in bad.stderr
