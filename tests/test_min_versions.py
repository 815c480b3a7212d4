"""The lowest dependency versions setup.cfg allows pass the core tests."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.large  # downloads TensorFlow into a fresh virtualenv
def test_the_lowest_versions_pass_the_core_tests(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "min_versions"), str(tmp_path / "venv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("lowest versions: tensorflow=="), lines[0]
    assert "passed" in lines[-1] and "failed" not in lines[-1], lines[-1]
