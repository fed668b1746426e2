"""docker/: no Docker engine runs here, so the files are checked with what can run: Compose's
own `config`, promtool on the Prometheus config and on every dashboard query, and loads of the
YAML and JSON against the metrics the server really exports."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from imageragturbo.service.metrics import ServiceMetrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "imageragturbo.json"


def _exported_sample_names() -> set[str]:
    metrics = ServiceMetrics(model="m", engine="torch", queue_depth=lambda: 0)
    metrics.observe_request(200, 0.01)
    metrics.batch_failures.inc()
    return {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_compose_has_the_service_prometheus_and_grafana_wired_together():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"irt", "irt-cpu", "prometheus", "grafana"}
    irt = services["irt"]
    assert irt["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / ".." / irt["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert irt["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {"IRT_MAX_BATCH", "IRT_BATCH_WAIT_MS", "IRT_MAX_QUEUE", "IRT_TIMEOUT_S", "IRT_API_KEY", "IRT_MAX_BODY_BYTES"} <= set(irt["environment"])
    # Every mounted file or folder exists in the repository.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["irt:8000"]
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["uid"] == "prometheus"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/imageragturbo.yml").read_text())["providers"][0]
    assert provider["options"]["path"] in {v.split(":")[1] for v in services["grafana"]["volumes"]}


def test_compose_config_accepts_the_file(compose_command):
    done = subprocess.run([*compose_command, "-f", str(DOCKER / "compose.yaml"), "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "irt:" in done.stdout and "prometheus:" in done.stdout and "grafana:" in done.stdout


def test_promtool_accepts_the_prometheus_config(promtool):
    done = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_shows_what_the_issue_asks_and_queries_only_real_metrics(tmp_path, promtool):
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in ("Per-stage latency p50", "Per-stage latency p95", "Retrieve vs denoise", "Throughput", "Queue depth", "Batch size", "Errors"):
        assert any(title.startswith(wanted) for title in titles), wanted
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(titles)
    assert all(panel["datasource"]["uid"] == "prometheus" for panel in dashboard["panels"])

    exported = _exported_sample_names()
    exprs = _dashboard_exprs()
    for title, expr in exprs:
        for name in re.findall(r"\b(irt_[a-z_]+)\b", expr):
            assert name in exported, f"panel {title!r} queries {name}, which the server does not export"
    # Every query parses as PromQL: promtool checks them as recording rules.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_dashboard_has_mode_and_database_variables_and_a_panel_per_stage_by_mode():
    from imageragturbo.service.metrics import SERVER_STAGES

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"mode", "database"}
    for name, variable in variables.items():
        assert variable["query"]["query"] == f"label_values(irt_stage_duration_seconds_count, {name})"
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
    # Every latency query follows the variables.
    for title, expr in _dashboard_exprs():
        for selector in re.findall(r"irt_(?:stage|request)_duration_seconds_\w+(\{[^}]*\})?", expr):
            assert 'mode=~"$mode"' in selector and 'database=~"$database"' in selector, (title, expr)
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    for stage in SERVER_STAGES:
        panel = by_title[f"Stage {stage} by mode (p50, p95)"]
        exprs = [target["expr"] for target in panel["targets"]]
        assert all(f'stage="{stage}"' in expr and "sum by (le, mode, database)" in expr for expr in exprs)
        assert [expr.split(",")[0] for expr in exprs] == ["histogram_quantile(0.5", "histogram_quantile(0.95"]


def test_dockerfile_is_a_non_root_cuda_image_with_gpu_runtimes_and_a_readiness_healthcheck():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-", text, re.M)
    assert "onnxruntime-gpu==" in text and "tensorrt-cu12==" in text
    assert re.search(r"^USER irt:irt$", text, re.M) and "useradd --system --uid 10001" in text
    healthcheck = next(line for line in text.splitlines() if line.strip().startswith("CMD [\"python\""))
    assert "/readyz" in healthcheck
    assert re.search(r"^EXPOSE 8000$", text, re.M) and "STOPSIGNAL SIGTERM" in text
    assert "--target baked" in text and "COPY --chown=irt:irt models/shapes-v2 /models/shapes-v2" in text
    # Pins match pyproject's, so the image serves what the tests test.
    pyproject = (DOCKER.parent / "pyproject.toml").read_text()
    for pin in re.findall(r"(torch==[\d.]+)", text):
        assert pin in pyproject
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    assert "!imageragturbo/**" in ignore and "!models/shapes-v2/**" in ignore


@pytest.mark.parametrize("path", sorted(p.relative_to(DOCKER).as_posix() for p in DOCKER.rglob("*.y*ml")))
def test_every_yaml_file_loads(path):
    assert isinstance(yaml.safe_load((DOCKER / path).read_text()), dict)


def test_the_gpu_service_names_device_dtype_and_engine_dir_and_a_cpu_profile_exists():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    gpu, cpu = compose["services"]["irt"], compose["services"]["irt-cpu"]
    command = " ".join(gpu["command"])
    for flag in ("--device", "--dtype", "--engine-dir", "--engine"):
        assert flag in command
    assert gpu["environment"]["IRT_DEVICE"] == "${IRT_DEVICE:-cuda}" and gpu["environment"]["IRT_DTYPE"] == "${IRT_DTYPE:-float16}"
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu" and "--device cpu" in " ".join(cpu["command"])
    assert "deploy" not in cpu


def test_the_images_default_to_the_gpu_in_fp16_and_wait_for_readyz():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.index("AS runtime"):dockerfile.index("AS baked")]
    assert "IRT_DEVICE=cuda IRT_DTYPE=float16" in runtime
    assert "HEALTHCHECK" in runtime and "/readyz" in runtime.split("HEALTHCHECK", 1)[1]
    cpu = dockerfile[dockerfile.index("AS cpu"):]
    assert "IRT_DEVICE=cpu IRT_DTYPE=float32" in cpu and "/readyz" in cpu
    assert dockerfile.rstrip().endswith("FROM runtime")  # the default target is the GPU image


def test_one_tensorrt_version_everywhere():
    from imageragturbo.engines.tensorrt_engine import TENSORRT_PIN

    root = DOCKER.parent
    for path in (DOCKER / "Dockerfile", root / "README.md", root / "docs" / "gpu-runbook.md"):
        pins = set(re.findall(r"tensorrt-cu12==[0-9.]+", path.read_text()))
        assert pins <= {TENSORRT_PIN}, f"{path.name} pins {pins}, the engine {TENSORRT_PIN}"
    assert TENSORRT_PIN in (DOCKER / "Dockerfile").read_text()
