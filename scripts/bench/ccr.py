"""claude-code-router, the peer measured beside the proxy: found or installed as its users
install it (`npm install`, a pinned version, cached), configured with a primary and a
`fallback` provider through its `Anthropic` transformer, and started as `ccr start` in the
foreground, one node process."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import BenchError
from .services import Service, Services, free_port, http_answers

CCR_PACKAGE = "@musistudio/claude-code-router"
CCR_VERSION = "2.0.0"  # pinned: runs on different days measure the same peer
CCR_CACHE = Path.home() / ".cache" / "claude-code-fallback" / "bench" / "ccr"
CCR_MODEL = "claude-sonnet-4-6"


@dataclass(frozen=True)
class Ccr:
    """An installed claude-code-router: its CLI, run with node."""

    node: str
    cli: Path
    version: str
    node_version: str


def ccr_package(directory: Path) -> Path | None:
    """claude-code-router in `directory`: an npm project, a global prefix, or the package itself."""
    for package in (
        directory / "node_modules" / CCR_PACKAGE,
        directory / "lib" / "node_modules" / CCR_PACKAGE,
        directory,
    ):
        if (package / "dist" / "cli.js").is_file() and (package / "package.json").is_file():
            return package
    return None


def install_ccr(directory: Path) -> str:
    """`npm install` claude-code-router into `directory`, as its users do; why not, if it failed."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "package.json"
    if not manifest.exists():  # else npm installs into the nearest project above `directory`
        manifest.write_text('{"name": "ccf-bench-ccr", "private": true}\n')
    print(f"installing {CCR_PACKAGE} into {directory} ...", flush=True)
    command = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", f"{CCR_PACKAGE}@{CCR_VERSION}"]
    try:
        result = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "npm install took more than 10 minutes"
    if result.returncode != 0:
        said = [x.removeprefix("npm error").strip() for x in (result.stderr + result.stdout).splitlines()]
        code = next((x.removeprefix("code ") for x in said if x.startswith("code ")), "")
        message = next((x for x in said if x and not x.startswith(("code ", "syscall ", "errno "))), "")
        why = ": ".join(x for x in (code, message) if x)
        return f"npm install failed ({why or f'exit status {result.returncode}'})"
    return ""


def package_version(package: Path) -> str:
    try:
        return str(json.loads((package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return ""


def find_ccr(directory: Path | None) -> tuple[Ccr | None, str]:
    """claude-code-router in `directory` (--ccr), else in the cache, installed there when absent.

    Returns it, or None and why not, to follow "claude-code-router ".
    """
    node = shutil.which("node")
    if node is None:
        return None, "cannot run: node is not installed"
    package = ccr_package(directory or CCR_CACHE)
    if package is None and directory is not None:
        return None, f"was not found: {directory} holds no {CCR_PACKAGE} with dist/cli.js"
    if directory is None and (package is None or package_version(package) != CCR_VERSION):
        why = install_ccr(CCR_CACHE)
        package = ccr_package(CCR_CACHE)
        if package is None:
            why = why or f"npm install left no {CCR_PACKAGE}/dist/cli.js in {CCR_CACHE}"
            return None, f"could not be installed: {why}"
    version = package_version(package)
    if not version:
        return None, f"cannot be used: {package / 'package.json'} gives no version"
    try:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot be used: `node --version` failed ({e})"
    return Ccr(node, package / "dist" / "cli.js", version, node_version.stdout.strip()), ""


def ccr_config(port: int, primary: str, backup: str) -> dict[str, Any]:
    """Its config: Anthropic passed through to `primary`, with `backup` as its fallback."""

    def provider(name: str, url: str) -> dict[str, Any]:
        return {
            "name": name,
            "api_base_url": f"{url}/v1/messages",
            "api_key": "sk-ant-bench",
            "models": [CCR_MODEL],
            "transformer": {"use": ["Anthropic"]},
        }

    return {
        "PORT": port,
        "HOST": "127.0.0.1",
        "LOG": False,
        "Providers": [provider("primary", primary), provider("backup", backup)],
        "Router": {"default": f"primary,{CCR_MODEL}"},
        "fallback": {"default": [f"backup,{CCR_MODEL}"]},
    }


def start_ccr(
    services: Services, ccr: Ccr, name: str, primary: str, backup: str, attempts: int = 3
) -> Service:
    """`ccr start` in the foreground, one node process, with a HOME of its own for its config."""
    home = services.workdir / f"{name}-home"
    (home / ".claude-code-router").mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        port = free_port()
        config = json.dumps(ccr_config(port, primary, backup), indent=2)
        (home / ".claude-code-router" / "config.json").write_text(config)
        service = services.spawn(name, [ccr.node, str(ccr.cli), "start"], env={"HOME": str(home)})
        service.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while service.proc.poll() is None and time.monotonic() < deadline:
            if http_answers(f"{service.url}/health"):
                return service
            time.sleep(0.05)
        tail = service.log_tail()
        services.stop([service])
        if "eaddrinuse" not in tail.lower():
            raise BenchError(f"{name} did not start:\n{tail}")
    raise BenchError(f"could not start {name}")
