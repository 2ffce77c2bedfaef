"""The operations files in deploy/: alerts, Prometheus, Grafana, Compose, Kubernetes, RabbitMQ,
Docker and systemd.

No services are needed, only tools: ``promtool`` (Debian: ``apt-get install prometheus``),
``systemd-analyze`` and PyYAML. A missing tool fails the test with how to install it; nothing is
skipped.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import dq_name, xq_name

from bench.common import set_deploy_policies
from worker.connections.queues import dead_letter_queue_arguments, work_queue_arguments
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.jobs.producer import queue_arguments
from worker.receipts.models import STATUS_QUEUE
from worker.runtime.jobs_exchange import JOB_QUEUES
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "verloop-worker.json"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD_UNIT = DEPLOY / "systemd" / "verloop-worker.service"
SYSTEMD_WEBHOOKS_UNIT = DEPLOY / "systemd" / "verloop-webhooks.service"
README = DEPLOY / "README.md"

MAIN_QUEUES = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)
#: Every queue the worker consumes: the job queues and the status queue (delivery receipts).
WORKER_QUEUES = (*MAIN_QUEUES, STATUS_QUEUE)
ALL_QUEUES = tuple(q for main in WORKER_QUEUES for q in (main, dq_name(main), xq_name(main)))
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}
WEBHOOKS_USER = "verloop-webhooks"

#: Metrics of RabbitMQ's rabbitmq_prometheus plugin that the alerts and the dashboard may use,
#: as /metrics/per-object names them (labels queue, vhost). Checked against the plugin's
#: collector (deps/rabbitmq_prometheus/src/collectors/
#: prometheus_rabbitmq_core_metrics_collector.erl) in RabbitMQ 3.10.8 and 3.13.7. Add a name
#: here only after checking it there.
RABBITMQ_METRICS = frozenset(
    {
        "rabbitmq_queue_messages",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_head_message_timestamp",
    }
)

#: Grafana's variables in the dashboard's queries, and what promtool sees instead.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "phone_id": ".*",
    "vhost": ".*",
}
METRIC_NAME = re.compile(r"\b(?:verloop|dramatiq|rabbitmq)_[A-Za-z0-9_]+\b")

_STATUSES = frozenset({"sent", "delivered", "read", "failed", "other"})
#: The delivery-receipt metrics (issue 15's contract): name -> (type, {label: its values, None
#: for any}), by who exports them. The alerts and the dashboard may use these names and label
#: values even before the code that declares them is merged; once any metric of a family is
#: declared under worker/, every one of that family must be
#: (test_declared_receipt_metrics_match_the_contract).
RECEIPT_METRICS: dict[str, dict[str, tuple[str, dict[str, frozenset[str] | None]]]] = {
    "status actor": {
        "verloop_statuses_total": (
            "counter",
            {"status": _STATUSES, "lane": frozenset({"transactional", "campaign", "unknown"})},
        ),
        "verloop_status_ignored_total": (
            "counter",
            {"reason": frozenset({"duplicate", "unknown_message"})},
        ),
        "verloop_status_lag_seconds": ("histogram", {"status": frozenset({"delivered", "read"})}),
        "verloop_number_statuses_total": ("counter", {"phone_id": None, "status": _STATUSES}),
        "verloop_status_failures_total": ("counter", {"code": None}),
    },
    "receiver": {
        "verloop_webhook_requests_total": (
            "counter",
            {
                "result": frozenset(
                    {
                        "accepted",
                        "bad_signature",
                        "too_large",
                        "malformed",
                        "unavailable",
                        "verified",
                        "verify_refused",
                        "not_found",
                    }
                )
            },
        ),
        "verloop_webhook_items_total": (
            "counter",
            {"kind": frozenset({"status", "message", "ignored"})},
        ),
        "verloop_webhook_publish_seconds": ("histogram", {}),
    },
}
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = frozenset({"job", "instance"})


# --- helpers ----------------------------------------------------------------------------------
def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail(
            "PyYAML is needed to check the deploy/ files and is not installed in this "
            "environment: add `pyyaml` to the `dev` extras in pyproject.toml and run "
            "`make install` (or `.venv/bin/pip install pyyaml`)"
        )
    return yaml


def _load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text(encoding="utf-8"))


def _load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in _yaml().safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; install it with: {install}")
    return path


def _promtool() -> str:
    return _tool("promtool", "apt-get update && apt-get install -y prometheus")


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    )


def _alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, its variables' included."""
    dashboard = _dashboard()
    queries = [
        (f"panel {panel['id']} {target.get('refId', '')}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else ""
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query or variable["definition"])
        assert match, f"variable {variable['name']}: expected label_values(selector, label)"
        queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def _grafana_to_promql(expr: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    # $name or ${name}; "$1" in label_replace is PromQL's, not Grafana's.
    return re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)", substitute, expr)


def _declared_metrics(source: Path) -> set[str]:
    """Series names of the Counter/Gauge/Histogram/Summary declared in ``source``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        func = node.func
        kind = (
            func.attr
            if isinstance(func, ast.Attribute)
            else func.id
            if isinstance(func, ast.Name)
            else ""
        )
        name = first.value
        if kind == "Counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        elif kind == "Gauge":
            names.add(name)
        elif kind == "Histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif kind == "Summary":
            names.update({name, f"{name}_sum", f"{name}_count"})
    return names


def _series_names(name: str, kind: str) -> set[str]:
    """The series a metric is exported as (a histogram's buckets, sum and count)."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def _receipt_series() -> dict[str, tuple[str, dict[str, frozenset[str] | None]]]:
    """Every series of RECEIPT_METRICS -> (its metric, its labels); buckets have ``le``."""
    series: dict[str, tuple[str, dict[str, frozenset[str] | None]]] = {}
    for family in RECEIPT_METRICS.values():
        for name, (kind, labels) in family.items():
            for one in _series_names(name, kind):
                extra: dict[str, frozenset[str] | None] = (
                    {"le": None} if one.endswith("_bucket") else {}
                )
                series[one] = (name, {**labels, **extra})
    return series


def _worker_declared_metrics() -> set[str]:
    """The verloop_* series declared anywhere under worker/ (the receiver has its own module)."""
    names: set[str] = set()
    for source in sorted((ROOT / "worker").rglob("*.py")):
        names |= {n for n in _declared_metrics(source) if n.startswith("verloop_")}
    return names


def _dramatiq_prometheus_source() -> Path:
    spec = importlib.util.find_spec("dramatiq")
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin).parent / "middleware" / "prometheus.py"


def _github_anchor(heading: str) -> str:
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def _readme_anchors() -> set[str]:
    return {
        _github_anchor(line.lstrip("#"))
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }


def _k8s_documents() -> dict[str, list[dict[str, Any]]]:
    """Manifests by kind (kustomization.yaml apart)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _load_yaml_all(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def _named(by_kind: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in by_kind.get(kind, []) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}"
    return found[0]


def _container_port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name])


def _keeps(job: dict[str, Any], service: dict[str, Any], port_name: str) -> bool:
    """Whether a Kubernetes scrape job's ``keep`` rules keep the endpoints of ``service``'s port
    ``port_name`` (service labels, annotations and the port name, as Prometheus's endpoints
    discovery names them)."""
    meta = {
        "__meta_kubernetes_endpoint_port_name": port_name,
        **{
            "__meta_kubernetes_service_label_" + re.sub(r"\W", "_", key): value
            for key, value in service["metadata"].get("labels", {}).items()
        },
        **{
            "__meta_kubernetes_service_annotation_" + re.sub(r"\W", "_", key): value
            for key, value in service["metadata"].get("annotations", {}).items()
        },
    }
    for rule in job["relabel_configs"]:
        if rule.get("action") != "keep":
            continue
        value = ";".join(meta.get(label, "") for label in rule["source_labels"])
        if re.fullmatch(rule["regex"], value) is None:
            return False
    return True


def _rabbit_password_matches(password: str, password_hash: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


# --- Prometheus: rules and configuration --------------------------------------------------------
def test_alert_rules_pass_promtool_check() -> None:
    _assert_ok(_run([_promtool(), "check", "rules", str(ALERTS)]))


def test_alert_rules_pass_their_unit_tests() -> None:
    _assert_ok(_run([_promtool(), "test", "rules", ALERTS_TEST.name], cwd=PROMETHEUS))


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = _load_yaml(ALERTS_TEST)["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - firing == set(), "alerts never shown firing in alerts_test.yml"
    assert names - quiet == set(), "alerts never shown not firing in alerts_test.yml"


def test_every_alert_has_for_severity_annotations_and_a_runbook_in_the_readme() -> None:
    anchors = _readme_anchors()
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:` duration"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "deploy/README.md", f"{name}: runbook_url should point to deploy/README.md"
        assert anchor == name.lower(), f"{name}: runbook anchor should be #{name.lower()}"
        assert anchor in anchors, f"{name}: deploy/README.md has no section '### {name}'"


def test_prometheus_config_passes_promtool_check() -> None:
    _assert_ok(_run([_promtool(), "check", "config", "prometheus.yml"], cwd=PROMETHEUS))


def test_prometheus_kubernetes_config_passes_promtool_check(tmp_path: Path) -> None:
    source = PROMETHEUS / "prometheus-kubernetes.yml"
    result = _run([_promtool(), "check", "config", source.name], cwd=PROMETHEUS)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in output:
        # Debian builds Prometheus without Kubernetes discovery: check everything else.
        config = _load_yaml(source)
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["placeholder:9191"]}]
        (tmp_path / source.name).write_text(_yaml().safe_dump(config), encoding="utf-8")
        shutil.copy(ALERTS, tmp_path / ALERTS.name)
        result = _run([_promtool(), "check", "config", source.name], cwd=tmp_path)
    _assert_ok(result)


def test_scrape_jobs_are_named_as_the_alerts_expect() -> None:
    for path in (PROMETHEUS / "prometheus.yml", PROMETHEUS / "prometheus-kubernetes.yml"):
        config = _load_yaml(path)
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert {"verloop-worker", "verloop-webhooks", "rabbitmq"} <= set(jobs), path.name
        # Per-queue series (label queue) with the plain rabbitmq_ names.
        assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object", path.name
        assert config["rule_files"] == ["alerts.yml"], path.name
    assert 'up{job="verloop-worker"}' in ALERTS.read_text(encoding="utf-8")
    assert 'up{job="verloop-webhooks"}' in ALERTS.read_text(encoding="utf-8")


# --- metric names -------------------------------------------------------------------------------
def test_metric_names_in_alerts_and_dashboard_exist() -> None:
    verloop = _worker_declared_metrics()
    dramatiq = _declared_metrics(_dramatiq_prometheus_source())
    message = "could not read the metric declarations of worker/observability/metrics.py"
    assert "verloop_sends_total" in verloop, message
    assert "verloop_api_request_duration_seconds_bucket" in verloop, message
    assert "dramatiq_messages_total" in dramatiq, "could not read dramatiq's metrics"
    known = verloop | dramatiq | RABBITMQ_METRICS | set(_receipt_series())
    used = [(f"alert {rule['alert']}", rule["expr"]) for rule in _alert_rules()]
    used += _dashboard_queries()
    found = [(name, where) for where, expr in used for name in METRIC_NAME.findall(expr)]
    assert any(name.startswith("verloop_") for name, _ in found)
    unknown = sorted({f"{name} ({where})" for name, where in found if name not in known})
    assert unknown == [], f"metrics that nothing exports: {unknown}"


def _alert_and_dashboard_queries() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in _alert_rules()] + [
        (where, _grafana_to_promql(expr)) for where, expr in _dashboard_queries()
    ]


def test_receipt_metrics_are_queried_with_their_contract_labels() -> None:
    """A typo in a label name or value (result="bad-signature", by (statu)) makes a query
    silently empty: every matcher and grouping on a delivery-receipt metric uses the contract's
    labels and values."""
    series = _receipt_series()
    matcher = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
    used = set()
    for where, expr in _alert_and_dashboard_queries():
        found = [name for name in METRIC_NAME.findall(expr) if name in series]
        for name in found:
            used.add(series[name][0])
            labels = series[name][1]
            for selector in re.findall(rf"\b{name}\{{([^}}]*)\}}", expr):
                for label, op, value in matcher.findall(selector):
                    assert label in labels or label in TARGET_LABELS, f"{where}: {name} {label}"
                    allowed = labels.get(label)
                    if allowed is None or op.startswith("!"):
                        continue
                    values = value.split("|") if op == "=~" else [value]
                    assert re.fullmatch(r"[\w|]+", value), f"{where}: {value!r}: list values"
                    assert set(values) <= allowed, f"{where}: {name}{{{label}}}: {values}"
        if found and all(name in series for name in METRIC_NAME.findall(expr)):
            known = set().union(*(series[name][1] for name in found)) | TARGET_LABELS
            for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                labels_used = {label.strip() for label in grouping.split(",") if label.strip()}
                assert labels_used <= known, f"{where}: by ({grouping})"
    assert used == {name for family in RECEIPT_METRICS.values() for name in family} - {
        "verloop_webhook_items_total"
    }, "every delivery-receipt metric but the items count is on the dashboard or in an alert"


def test_declared_receipt_metrics_match_the_contract() -> None:
    """Once the code of a family (the status actor, the receiver) declares any of its metrics,
    it declares all of them under the names the alerts and the dashboard use."""
    declared = _worker_declared_metrics()
    for family, metrics in RECEIPT_METRICS.items():
        expected = {s for name, (kind, _) in metrics.items() for s in _series_names(name, kind)}
        if declared & expected:
            assert expected <= declared, f"{family}: not declared: {sorted(expected - declared)}"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{n}", "expr": _grafana_to_promql(expr)}
        for n, (_, expr) in enumerate(_dashboard_queries())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(
        _yaml().safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    _assert_ok(_run([_promtool(), "check", "rules", str(path)]))


# --- Grafana ------------------------------------------------------------------------------------
def test_dashboard_panels_have_a_datasource_and_a_query() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert "campaign" in dashboard["description"].lower()  # campaign panels: not yet, and why
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel.get("datasource", {}).get("uid") == "${datasource}", where
        assert panel.get("targets"), f"{where}: no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{where}: empty query"
            assert target.get("refId"), where
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), where


def test_dashboard_covers_the_requested_metrics() -> None:
    exprs = " ".join(expr for _, expr in _dashboard_queries())
    for needed in (
        "verloop_sends_total",
        "verloop_number_rate_limit",
        "verloop_api_request_duration_seconds_bucket",
        'status="429"',
        "verloop_retries_total",
        "verloop_deferrals_total",
        "verloop_dead_letters_total",
        "rabbitmq_queue_messages",
        "verloop_rate_limit_wait_seconds_bucket",
        "verloop_token_lookups_total",
    ):
        assert needed in exprs, needed


def test_dashboard_has_the_delivery_funnel_row() -> None:
    dashboard = _dashboard()
    top = dashboard["panels"]
    [row] = [p for p in top if p["type"] == "row" and p["title"] == "Delivery funnel"]
    start = top.index(row) + 1
    end = next((i for i in range(start, len(top)) if top[i]["type"] == "row"), len(top))
    panels = row["panels"] if row.get("collapsed") else top[start:end]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needed in (
        "verloop_statuses_total",
        "verloop_number_statuses_total",
        "verloop_status_failures_total",
        "verloop_status_lag_seconds_bucket",
        "verloop_status_ignored_total",
        "verloop_webhook_requests_total",
        "verloop_webhook_publish_seconds_bucket",
        'queue="verloop.status"',
    ):
        assert needed in exprs, needed
    assert all(p["gridPos"]["y"] > row["gridPos"]["y"] for p in panels)


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(_dashboard()["panels"]):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    datasources = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")
    (provider,) = providers["providers"]
    grafana = _load_yaml(COMPOSE)["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


# --- Docker Compose -----------------------------------------------------------------------------
def test_compose_file_has_the_services_and_existing_mounts() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"rabbitmq", "redis", "worker", "webhooks", "prometheus", "grafana", "sandbox"} <= set(
        services
    )
    for name in ("worker", "webhooks", "sandbox"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["sandbox"]["profiles"] == ["sandbox"]
    sandbox_command = ["sandbox", "--host", "0.0.0.0", "--port", "8765"]  # noqa: S104
    assert services["sandbox"]["command"] == sandbox_command
    assert all("profiles" not in s for n, s in services.items() if n != "sandbox")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3-management")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text(encoding="utf-8")
    assert "rabbitmq_prometheus" in plugins
    assert "rabbitmq_management" in plugins


def test_compose_worker_settings_are_real_settings() -> None:
    worker = _load_yaml(COMPOSE)["services"]["worker"]
    environment = worker["environment"]
    assert set(environment) <= SETTING_NAMES, set(environment) - SETTING_NAMES
    grace = float(str(worker["stop_grace_period"]).removesuffix("s"))
    assert grace > float(environment["SHUTDOWN_TIMEOUT_S"])
    assert worker["command"][0] == "run"
    assert "--processes" in worker["command"]
    sandbox_env = dict(
        line.split("=", 1)
        for line in (DEPLOY / "sandbox.env").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert set(sandbox_env) - {"COMPOSE_PROFILES"} <= SETTING_NAMES


def test_compose_rabbitmq_password_matches_the_definitions() -> None:
    services = _load_yaml(COMPOSE)["services"]
    users = {u["name"]: u for u in json.loads(DEFINITIONS.read_text(encoding="utf-8"))["users"]}
    for service, user in (("worker", "verloop-worker"), ("webhooks", WEBHOOKS_USER)):
        url = urlsplit(services[service]["environment"]["AMQP_URL"])
        assert url.username == user, service
        assert url.username in users, f"{url.username} is not in definitions.json"
        assert _rabbit_password_matches(
            unquote(url.password or ""), users[url.username]["password_hash"]
        )


def test_compose_runs_the_webhook_receiver_on_its_ports() -> None:
    compose = _load_yaml(COMPOSE)
    webhooks = compose["services"]["webhooks"]
    environment = webhooks["environment"]
    assert set(environment) <= SETTING_NAMES, set(environment) - SETTING_NAMES
    assert webhooks["command"] == ["webhooks"]
    port = int(environment["WEBHOOK_PORT"])
    metrics_port = int(environment["WEBHOOK_METRICS_PORT"])
    assert (port, metrics_port) == (DEFAULTS["webhook_port"], DEFAULTS["webhook_metrics_port"])
    assert environment["WEBHOOK_PATH"] == DEFAULTS["webhook_path"]
    # Only the webhook port is published, on the host's loopback (a TLS proxy goes in front);
    # the metrics port stays inside the Compose network.
    assert webhooks["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"http://127.0.0.1:{metrics_port}/healthz" in " ".join(webhooks["healthcheck"]["test"])
    assert webhooks["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert {"WEBHOOK_APP_SECRET", "WEBHOOK_VERIFY_TOKEN"} <= set(environment)
    # The receiver's secrets are not the worker's, and the worker's are not the receiver's.
    worker = compose["services"]["worker"]["environment"]
    assert not {"WEBHOOK_APP_SECRET", "WEBHOOK_VERIFY_TOKEN"} & set(worker)
    assert not {"REDIS_URL", "VERLOOP_SYSTEM_TOKEN", "VERLOOP_PASSWORD"} & set(environment)
    # Prometheus finds it by its service name, on its metrics port.
    jobs = {j["job_name"]: j for j in _load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    [discovery] = jobs["verloop-webhooks"]["dns_sd_configs"]
    assert discovery["names"] == ["webhooks"]
    assert discovery["port"] == metrics_port


# --- RabbitMQ definitions -----------------------------------------------------------------------
def test_definitions_declare_the_queues_as_the_worker_does() -> None:
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    queues = {q["name"]: q for q in definitions["queues"]}
    assert set(queues) == set(ALL_QUEUES)
    for main in WORKER_QUEUES:
        # dramatiq declares a queue and its delay queue with the same arguments.
        assert queues[main]["arguments"] == queue_arguments(main)
        assert queues[dq_name(main)]["arguments"] == queue_arguments(main)
        assert queues[xq_name(main)]["arguments"] == {"x-message-ttl": DEAD_MESSAGE_TTL}
    for queue in queues.values():
        assert queue["durable"] is True
        assert queue["auto_delete"] is False
        assert queue["vhost"] == "/"


def _policies_applied(vhost: str, *, default_queue_type: str | None = None) -> dict[str, Any]:
    """Apply definitions.json's policies to a new ``vhost`` of the real RabbitMQ, declare every
    queue the way the worker's classic path does (dramatiq's arguments), and return, per
    queue, its type and the policy RabbitMQ applied; the vhost is deleted after."""
    ctl = _tool("rabbitmqctl", "apt-get install -y rabbitmq-server")
    _run([ctl, "-q", "delete_vhost", vhost])
    default = ["--default-queue-type", default_queue_type] if default_queue_type else []
    _assert_ok(_run([ctl, "-q", "add_vhost", vhost, *default]))
    try:
        _assert_ok(_run([ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]))
        policies = {p["name"]: p for p in set_deploy_policies(ctl, vhost)}
        connection = pika.BlockingConnection(
            pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        )
        try:
            channel = connection.channel()
            for main in WORKER_QUEUES:
                channel.queue_declare(main, durable=True, arguments=queue_arguments(main))
                channel.queue_declare(dq_name(main), durable=True, arguments=queue_arguments(main))
                dead = {"x-message-ttl": DEAD_MESSAGE_TTL}
                channel.queue_declare(xq_name(main), durable=True, arguments=dead)
        finally:
            connection.close()
        listing = [ctl, "-q", "list_queues", "-p", vhost, "name", "type", "policy"]
        listed = _run([*listing, "--formatter", "json"])
        _assert_ok(listed)
        rows = json.loads(listed.stdout)
        return {"policies": policies, "queues": {row.pop("name"): row for row in rows}}
    finally:
        _run([ctl, "-q", "delete_vhost", vhost])


def test_definitions_make_the_long_queues_lazy_and_leave_the_transactional_queue_alone() -> None:
    """The policy keeps a campaign's millions of jobs (and dead letters) on disk rather than in
    memory (RabbitMQ before 3.12 pages a long in-memory queue out in bulk; from 3.12 classic
    queues behave this way anyway and ignore the key). A real RabbitMQ applies it, the way
    ``make bench`` does, to a vhost of its own, so the check covers RabbitMQ's own pattern
    matching, not just ours. The quorum policies hold keys classic queues do not take, so
    RabbitMQ applies none of them to a classic queue."""
    lazy = {CAMPAIGN_QUEUE, dq_name(CAMPAIGN_QUEUE), *(xq_name(q) for q in WORKER_QUEUES)}
    applied = _policies_applied("verloop-policy-check")
    policies = applied["policies"]
    assert policies["verloop-long-queues"]["definition"] == {"queue-mode": "lazy"}
    assert {row["type"] for row in applied["queues"].values()} == {"classic"}
    named = {q: row["policy"] for q, row in applied["queues"].items() if row["policy"]}
    assert named == dict.fromkeys(lazy, "verloop-long-queues")


def test_definitions_give_quorum_queues_the_worker_s_quorum_arguments() -> None:
    """The vhost route (a vhost whose default queue type is quorum, dramatiq's own declarations
    unchanged): every queue becomes quorum and gets, by policy, what QUEUE_TYPE=quorum would
    have declared."""
    applied = _policies_applied("verloop-policy-check-quorum", default_queue_type="quorum")
    policies = applied["policies"]
    for name, row in applied["queues"].items():
        assert row["type"] == "quorum", name
        definition = policies[row["policy"]]["definition"]
        if name.endswith(".XQ"):
            expected = dead_letter_queue_arguments("quorum")
        else:
            expected = work_queue_arguments(name.removesuffix(".DQ"), "quorum")
        for key, value in expected.items():
            if key.startswith("x-") and key[2:] in definition:
                assert definition[key[2:]] == value, (name, key)
        assert "x-delivery-limit" in expected
        assert definition["delivery-limit"] == expected["x-delivery-limit"], name
        if not name.endswith(".XQ"):
            assert definition["dead-letter-strategy"] == "at-least-once", name
            assert definition["overflow"] == "reject-publish", name
        assert "max-priority" not in definition


def test_definitions_permissions_are_least_privilege() -> None:
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    perms = {p["user"]: p for p in definitions["permissions"]}

    def allows(user: str, kind: str, resource: str) -> bool:
        return re.search(perms[user][kind], resource) is not None  # RabbitMQ: unanchored match

    others = ["other.queue", "amq.topic", "amq.direct", "verloopx"]
    worker, producer, keda = "verloop-worker", "verloop-producer", "verloop-keda"
    assert all(allows(worker, k, q) for k in ("configure", "read") for q in ALL_QUEUES)
    assert allows(worker, "write", "amq.default")
    assert not any(allows(worker, k, r) for k in ("configure", "write", "read") for r in others)
    assert all(allows(producer, "configure", q) for q in MAIN_QUEUES)
    assert not any(allows(producer, "configure", q) for q in ALL_QUEUES if q not in MAIN_QUEUES)
    assert allows(producer, "write", "amq.default")
    assert not any(allows(producer, "write", r) for r in [*ALL_QUEUES, *others])
    assert not any(allows(producer, "read", r) for r in [*ALL_QUEUES, *others, "amq.default"])
    assert not any(
        allows(keda, k, r)
        for k in ("configure", "write", "read")
        for r in [*ALL_QUEUES, *others, "amq.default"]
    )
    # The jobs producer writes to the jobs exchange and nothing else: not amq.default (the
    # default exchange, which reaches every queue), not the events exchange, no queue.
    jobs_producer = "verloop-jobs-producer"
    jobs_exchange = Settings.model_fields["jobs_exchange"].default
    assert allows(jobs_producer, "write", jobs_exchange)
    assert not any(
        allows(jobs_producer, "write", r)
        for r in [*ALL_QUEUES, *others, "amq.default", "verloop.events", "verloop.jobsx"]
    )
    everything = [*ALL_QUEUES, *others, "amq.default", "verloop.events", jobs_exchange]
    assert not any(allows(jobs_producer, k, r) for k in ("configure", "read") for r in everything)
    # The worker declares the jobs exchange and binds its queues to it.
    assert allows(worker, "configure", jobs_exchange)
    assert allows(worker, "read", jobs_exchange)
    assert all(allows(worker, "write", q) for q in MAIN_QUEUES)
    tags = {u["name"]: u["tags"] for u in definitions["users"]}
    assert tags[worker] == tags[producer] == tags[jobs_producer] == tags[keda] == []
    assert "guest" not in tags
    assert {p["user"] for p in definitions["permissions"]} == set(tags)


def test_definitions_let_the_webhooks_user_publish_status_jobs_and_inbound_events_only() -> None:
    """Write on the statuses exchange (bound to verloop.status alone: the default exchange would
    reach every queue) and on the events exchange, where a topic permission allows
    inbound.message.* routing keys only (no forged outcome events); configure and read nothing.
    tests/integration/test_permissions.py tries it on RabbitMQ."""
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    [perm] = [p for p in definitions["permissions"] if p["user"] == WEBHOOKS_USER]
    events = Settings.model_fields["events_exchange"].default
    jobs_exchange = Settings.model_fields["jobs_exchange"].default
    statuses = Settings.model_fields["status_exchange"].default
    everything = [
        *ALL_QUEUES,
        "amq.default",
        "amq.topic",
        events,
        jobs_exchange,
        statuses,
        "other.queue",
    ]
    for kind in ("configure", "read"):
        assert not any(re.search(perm[kind], r) for r in everything), kind
    writable = {
        r
        for r in [*everything, f"{events}x", f"{statuses}x", "verloop.status.x"]
        if re.search(perm["write"], r)
    }
    assert writable == {statuses, events}
    topics = [t for t in definitions["topic_permissions"] if t["user"] == WEBHOOKS_USER]
    assert [(t["vhost"], t["exchange"]) for t in topics] == [("/", events)]
    (topic,) = topics
    assert re.search(topic["write"], "inbound.message.1234567890")
    for forged in ("status.delivered.acme.p1.c1", "send.sent.acme.p1.none", "xinbound.message.1"):
        assert not re.search(topic["write"], forged), forged
    assert not re.search(topic["read"], "inbound.message.1")
    [user] = [u for u in definitions["users"] if u["name"] == WEBHOOKS_USER]
    assert user["tags"] == []


def test_definitions_declare_the_jobs_exchange_as_the_worker_does() -> None:
    """Direct, durable, bound to the three job queues by their own names (and the statuses
    exchange to the status queue), as worker.runtime.jobs_exchange declares them (a mismatch
    would make RabbitMQ refuse the worker's declaration)."""
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    name = Settings.model_fields["jobs_exchange"].default
    statuses = Settings.model_fields["status_exchange"].default
    for declared in (name, statuses):
        [exchange] = [e for e in definitions["exchanges"] if e["name"] == declared]
        assert exchange["type"] == "direct"
        assert exchange["durable"] is True
        assert exchange["auto_delete"] is exchange["internal"] is False
        assert exchange["arguments"] == {}
    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in definitions["bindings"]
    }
    assert bindings == {(name, queue, "queue", queue) for queue in JOB_QUEUES} | {
        (statuses, STATUS_QUEUE, "queue", STATUS_QUEUE)
    }
    assert set(JOB_QUEUES) == set(MAIN_QUEUES)


# --- Kubernetes ---------------------------------------------------------------------------------
def test_k8s_manifests_parse_and_have_the_expected_kinds() -> None:
    by_kind = _k8s_documents()
    assert set(by_kind) == {
        "Deployment",
        "ConfigMap",
        "Secret",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
    }
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_deployment_is_hardened_and_stops_gracefully() -> None:
    by_kind = _k8s_documents()
    config = _named(by_kind, "ConfigMap", "verloop-worker")["data"]
    pod = _named(by_kind, "Deployment", "verloop-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] > float(config["SHUTDOWN_TIMEOUT_S"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    # The writable places are emptyDirs: METRICS_DIR and /tmp.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get(config["METRICS_DIR"]) in empty_dirs
    assert mounts.get("/tmp") in empty_dirs  # noqa: S108 - the container's own /tmp
    check = ["verloop-worker", "check", "--services-only"]
    assert container["readinessProbe"]["exec"]["command"] == check
    liveness = ["verloop-worker", "check", "--live"]
    assert container["livenessProbe"]["exec"]["command"] == liveness
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert container["args"][0] == "run"
    assert "--processes" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(config["METRICS_PORT"])


def test_k8s_settings_and_secrets_are_consistent() -> None:
    by_kind = _k8s_documents()
    config = _named(by_kind, "ConfigMap", "verloop-worker")
    secret = _named(by_kind, "Secret", "verloop-worker")
    deployment = _named(by_kind, "Deployment", "verloop-worker")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert set(config["data"]) <= SETTING_NAMES, set(config["data"]) - SETTING_NAMES
    secret_keys = set(secret["stringData"])
    assert {"AMQP_URL", "REDIS_URL", "VERLOOP_SYSTEM_TOKEN"} <= secret_keys
    assert secret_keys - {"KEDA_AMQP_URL"} <= SETTING_NAMES
    assert all("CHANGE-ME" in value for value in secret["stringData"].values()), "placeholders"
    assert not set(config["data"]) & secret_keys
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= SETTING_NAMES
    for item in env.values():
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret_keys
    assert "KEDA_AMQP_URL" not in env  # KEDA's credentials stay out of the worker pods
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]


def test_k8s_service_pdb_and_keda_point_at_the_deployment() -> None:
    by_kind = _k8s_documents()
    deployment = _named(by_kind, "Deployment", "verloop-worker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _named(by_kind, "Service", "verloop-worker-metrics")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    assert str(port["port"]) == service["metadata"]["annotations"]["prometheus.io/port"]
    pdb = _named(by_kind, "PodDisruptionBudget", "verloop-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    scaled = _named(by_kind, "ScaledObject", "verloop-worker")
    auth = _named(by_kind, "TriggerAuthentication", "verloop-worker-rabbitmq")
    secret = _named(by_kind, "Secret", "verloop-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    triggers = scaled["spec"]["triggers"]
    assert {t["metadata"]["queueName"] for t in triggers} == {SEND_QUEUE, CAMPAIGN_QUEUE}
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_k8s_webhook_receiver_is_hardened_and_probed_on_its_metrics_port() -> None:
    by_kind = _k8s_documents()
    config = _named(by_kind, "ConfigMap", "verloop-worker")["data"]
    deployment = _named(by_kind, "Deployment", "verloop-webhooks")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["webhooks"]
    assert deployment["spec"]["replicas"] >= 2  # WhatsApp always has one to answer it
    assert _container_port(container, "http") == int(config["WEBHOOK_PORT"])
    assert _container_port(container, "metrics") == int(config["WEBHOOK_METRICS_PORT"])
    assert int(config["WEBHOOK_PORT"]) == DEFAULTS["webhook_port"]
    assert int(config["WEBHOOK_METRICS_PORT"]) == DEFAULTS["webhook_metrics_port"]
    assert config["WEBHOOK_PATH"] == DEFAULTS["webhook_path"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get("/tmp") in empty_dirs  # noqa: S108 - the container's own /tmp
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    # The pause before SIGTERM and the answers in flight fit in the grace period.
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    publish_timeout = float(config["WEBHOOK_PUBLISH_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pause + publish_timeout


def test_k8s_webhook_receiver_gets_its_own_secret_and_the_worker_does_not() -> None:
    by_kind = _k8s_documents()
    secret = _named(by_kind, "Secret", "verloop-webhooks")
    keys = set(secret["stringData"])
    assert keys == {"AMQP_URL", "WEBHOOK_APP_SECRET", "WEBHOOK_VERIFY_TOKEN"}
    assert all("CHANGE-ME" in value for value in secret["stringData"].values()), "placeholders"
    assert urlsplit(secret["stringData"]["AMQP_URL"]).username == WEBHOOKS_USER
    container = _named(by_kind, "Deployment", "verloop-webhooks")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {key: {"name": "verloop-webhooks", "key": key} for key in keys}
    assert container["envFrom"] == [{"configMapRef": {"name": "verloop-worker"}}]
    worker = _named(by_kind, "Deployment", "verloop-worker")["spec"]["template"]["spec"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for c in worker["containers"] for e in c["env"]}
    assert refs == {"verloop-worker"}
    worker_keys = set(_named(by_kind, "Secret", "verloop-worker")["stringData"])
    assert not worker_keys & {"WEBHOOK_APP_SECRET", "WEBHOOK_VERIFY_TOKEN"}
    config = _named(by_kind, "ConfigMap", "verloop-worker")["data"]
    assert not set(config) & keys


def test_k8s_webhook_services_pdb_and_scrape_job_select_the_receiver_only() -> None:
    by_kind = _k8s_documents()
    config = _named(by_kind, "ConfigMap", "verloop-worker")["data"]
    receiver = _pod_labels(_named(by_kind, "Deployment", "verloop-webhooks"))
    worker = _pod_labels(_named(by_kind, "Deployment", "verloop-worker"))
    public = _named(by_kind, "Service", "verloop-webhooks")
    metrics = _named(by_kind, "Service", "verloop-webhooks-metrics")
    worker_metrics = _named(by_kind, "Service", "verloop-worker-metrics")
    # The Ingress's Service: ClusterIP (TLS is the Ingress's job), the webhook port only.
    assert public["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["targetPort"]) for p in public["spec"]["ports"]] == [("http", "http")]
    assert "annotations" not in public["metadata"]
    (port,) = metrics["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    assert int(metrics["metadata"]["annotations"]["prometheus.io/port"]) == port["port"]
    assert port["port"] == int(config["WEBHOOK_METRICS_PORT"])
    for service in (public, metrics):
        assert _selects(service["spec"]["selector"], receiver)
        assert not _selects(service["spec"]["selector"], worker)
    assert not _selects(worker_metrics["spec"]["selector"], receiver)
    pdb = _named(by_kind, "PodDisruptionBudget", "verloop-webhooks")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], receiver)
    assert not _selects(pdb["spec"]["selector"]["matchLabels"], worker)
    replicas = _named(by_kind, "Deployment", "verloop-webhooks")["spec"]["replicas"]
    assert pdb["spec"]["maxUnavailable"] < replicas
    worker_pdb = _named(by_kind, "PodDisruptionBudget", "verloop-worker")
    assert not _selects(worker_pdb["spec"]["selector"]["matchLabels"], receiver)
    # Each Kubernetes scrape job keeps its own pods' metrics and nothing else.
    jobs = {
        j["job_name"]: j
        for j in _load_yaml(PROMETHEUS / "prometheus-kubernetes.yml")["scrape_configs"]
    }
    assert _keeps(jobs["verloop-webhooks"], metrics, "metrics")
    assert not _keeps(jobs["verloop-webhooks"], worker_metrics, "metrics")
    assert not _keeps(jobs["verloop-webhooks"], public, "http")
    assert _keeps(jobs["verloop-worker"], worker_metrics, "metrics")
    assert not _keeps(jobs["verloop-worker"], metrics, "metrics")


# --- Dockerfile ---------------------------------------------------------------------------------
def test_dockerfile_runs_the_worker_unprivileged_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [
        line.strip()
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms
    assert all(image == "python:3.11-slim" for image in froms)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    healthcheck = next(line for line in instructions if line.startswith("HEALTHCHECK "))
    assert '"check", "--services-only"' in healthcheck
    assert 'ENTRYPOINT ["verloop-worker"]' in instructions
    assert instructions[-1] == 'CMD ["run"]'
    assert "EXPOSE 9191" in instructions
    assert any("pip install ." in line for line in instructions)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for line in instructions:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignore}, (
                    f"COPY {source}: left out of the build context by Dockerfile.dockerignore"
                )


# --- systemd ------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [SYSTEMD_UNIT, SYSTEMD_WEBHOOKS_UNIT], ids=lambda p: p.name)
def test_systemd_unit_passes_systemd_analyze_verify(source: Path, tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "apt-get install -y systemd")
    executable = Path(sys.executable).parent / "verloop-worker"
    assert executable.exists(), f"{executable}: install the project (make install)"
    text = source.read_text(encoding="utf-8")
    assert "/opt/verloop-worker/bin/verloop-worker" in text
    unit = tmp_path / source.name
    unit.write_text(
        text.replace("/opt/verloop-worker/bin/verloop-worker", str(executable)), encoding="utf-8"
    )
    result = _run([analyze, "verify", str(unit)])
    _assert_ok(result)
    # Unknown keys and other mistakes are only warnings: none is allowed.
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_webhooks_unit_runs_the_receiver_with_its_own_settings() -> None:
    worker = _unit_settings(SYSTEMD_UNIT)
    webhooks = _unit_settings(SYSTEMD_WEBHOOKS_UNIT)
    assert webhooks["ExecStart"] == ["/opt/verloop-worker/bin/verloop-worker webhooks"]
    assert "ExecStartPre" not in webhooks  # `check --services-only` would need Redis too
    # Its own environment file (its RabbitMQ user, the app secret), the worker's user and group.
    (environment_file,) = webhooks["EnvironmentFile"]
    assert environment_file not in worker["EnvironmentFile"]
    assert Path(environment_file).parent == Path(worker["EnvironmentFile"][0]).parent
    assert (webhooks["User"], webhooks["Group"]) == (worker["User"], worker["Group"])
    # The same hardening as the worker's unit.
    hardening = {k: v for k, v in worker.items() if k.startswith(("Protect", "Private", "No"))}
    assert hardening
    assert {k: webhooks.get(k) for k in hardening} == hardening
