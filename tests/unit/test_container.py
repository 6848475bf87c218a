"""The container files (issue #5). Docker cannot run on this machine, so this checks what
can be checked without it: the image's shape, that its command is one the CLI accepts with
the documented config path, that the mounted config is valid and agrees with the healthcheck
and the compose file, and that every file the compose file mounts exists."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from pgtenant.cli import build_parser
from pgtenant.configfile import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = (ROOT / "docker-compose.yml").read_text()
CONFIG_PATH = "/etc/pgtenant/pgtenant.toml"


def _instructions(name: str) -> list[str]:
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def test_image_is_multi_stage_non_root_with_healthcheck_and_stop_signal() -> None:
    stages = _instructions("FROM")
    assert len(stages) >= 2 and stages[0].endswith("AS build")
    assert any("--from=build" in c for c in _instructions("COPY"))
    (user,) = _instructions("USER")
    assert user not in ("root", "0")
    assert _instructions("STOPSIGNAL") == ["SIGTERM"]
    (health,) = _instructions("HEALTHCHECK")
    assert "http://127.0.0.1:9127/healthz" in health


def test_image_command_is_the_cli_serving_the_documented_config_path() -> None:
    (entrypoint,) = _instructions("ENTRYPOINT")
    (cmd,) = _instructions("CMD")
    argv = json.loads(entrypoint) + json.loads(cmd)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and scripts[argv[0]] == "pgtenant.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config == CONFIG_PATH
    assert f"PGTENANT_CONFIG={CONFIG_PATH}" in DOCKERFILE


def test_compose_config_is_valid_and_agrees_with_the_image() -> None:
    config = load_config(ROOT / "config/docker/pgtenant.toml")
    assert config.listen == ("0.0.0.0", 6432)
    assert config.metrics.listen == "0.0.0.0:9127"  # the healthcheck's port
    assert config.admin.token_sha256 is not None
    (db,) = config.databases.values()
    assert db.dsn.host == "postgres"  # the compose service
    assert f":{CONFIG_PATH}:ro" in COMPOSE


def test_compose_has_the_four_services_and_mounts_files_that_exist() -> None:
    services = re.findall(r"^  ([a-z-]+):$", COMPOSE, re.M)
    assert {"postgres", "pgtenant", "prometheus", "grafana"} <= set(services)
    for source in re.findall(r"- \./([^:]+):", COMPOSE):
        assert (ROOT / source).exists(), source
    scrape = (ROOT / "config/docker/prometheus.yml").read_text()
    assert '"pgtenant:9127"' in scrape
    init = re.search(r"command: (\[.*?\])", COMPOSE, re.S)
    assert init is not None
    argv = json.loads(init.group(1))
    args = build_parser().parse_args(argv)
    assert args.command == "init" and args.config == CONFIG_PATH


def test_the_wheel_ships_the_example_config_and_the_demo_history(tmp_path: Path) -> None:
    """`pip install pgtenant` gives the example config (`pgtenant example-config`) and the
    demo's migration history: both are package data of the import package ``pgtenant``."""
    import os
    import subprocess
    import sys
    import zipfile

    # Package data does not depend on the build: PGTENANT_PURE skips the mypyc compile
    # (minutes on 2 cores), which setup.py would otherwise run for this wheel too.
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PGTENANT_PURE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("pgtenant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pgtenant/pgtenant.example.toml" in names
    assert "pgtenant/__main__.py" in names and "pgtenant/protocol/frames.py" in names
    assert any(n.startswith("pgtenant/control/demo_migrations/0001") for n in names)
    assert not any(n.startswith(("proxy/", "tests/", "benchmarks/")) for n in names)
    example = zipfile.ZipFile(wheel).read("pgtenant/pgtenant.example.toml").decode()
    assert example == (ROOT / "config" / "pgtenant.example.toml").read_text()
    load_config_text = tomllib.loads(example)
    assert "databases" in load_config_text and "tenant_types" in load_config_text


def test_example_config_command_prints_the_packaged_file() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pgtenant", "example-config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "config" / "pgtenant.example.toml").read_text()
