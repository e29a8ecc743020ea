"""The installed layout: a wheel (not an editable install) carries everything `ccf` needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT


def run_ccf(site: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); "
        "from claude_code_fallback.cli import main; sys.exit(main())"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "CLAUDE_FALLBACK_HOME": str(home / "ccf")}
    return subprocess.run(
        [sys.executable, "-P", "-c", code, *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_built_wheel_runs_the_demo_and_ships_the_example_config(tmp_path):
    # Built from a copy: a checkout's own build/ may hold modules it no longer has.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv*", "build", "site", "*.egg-info", "__pycache__"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("claude_code_fallback-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "claude_code_fallback/fallback.py" in names and "claude_code_fallback/lean/master.py" in names
    assert "claude_code_fallback/ops/dashboard.html" in names  # the status page
    assert "claude_code_fallback/cost/prices.yaml" in names  # the price table
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ccf = claude_code_fallback.cli:main" in (site / entry_points).read_text()
    example = site / "claude_code_fallback" / "config.example.yaml"
    assert example.is_file() and not example.is_symlink()

    home = tmp_path / "home"
    home.mkdir()
    (home / "attr.py").write_text(
        "raise SystemExit('a stray module in the current directory was imported')\n"
    )
    demo = run_ccf(site, home, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "answered by: backup" in demo.stdout
    init = run_ccf(site, home, "init")
    assert init.returncode == 0, init.stderr
    assert (home / "ccf" / "config.yaml").read_text() == example.read_text()
