"""The `logand` console script: subcommands exist, errors are one clear line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def logand(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_help_lists_every_subcommand() -> None:
    out = logand("--help").stdout
    for cmd in ("serve", "check-config", "export-onnx", "train-rm", "probe-rm"):
        assert cmd in out


def test_check_config_resolves_and_rejects(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"models": [{"name": "m", "path": "x"}]}))
    done = logand("check-config", str(good))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["server"]["host"] == "127.0.0.1"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "m", "path": "x", "backend": "tensorrt"}]}))
    done = logand("check-config", str(bad))
    assert done.returncode == 2 and "models.0.backend" in done.stderr and "Traceback" not in done.stderr


def test_export_onnx_reports_parity(tiny_bert: Path, tmp_path: Path) -> None:
    done = logand("export-onnx", str(tiny_bert), str(tmp_path / "onnx"))
    assert done.returncode == 0, done.stderr
    assert "max |torch - onnxruntime|" in done.stdout and (tmp_path / "onnx" / "model.onnx").is_file()
