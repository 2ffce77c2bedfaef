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
from worker.jobs.models import CAMPAIGN_QUEUE, MANAGE_QUEUE, SEND_QUEUE
from worker.jobs.producer import queue_arguments
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
README = DEPLOY / "README.md"

MAIN_QUEUES = (SEND_QUEUE, CAMPAIGN_QUEUE, MANAGE_QUEUE)
ALL_QUEUES = tuple(q for main in MAIN_QUEUES for q in (main, dq_name(main), xq_name(main)))
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)

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


def _one(by_kind: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    assert len(by_kind.get(kind, [])) == 1, f"expected one {kind}"
    return by_kind[kind][0]


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
        assert {"verloop-worker", "rabbitmq"} <= set(jobs), path.name
        # Per-queue series (label queue) with the plain rabbitmq_ names.
        assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object", path.name
        assert config["rule_files"] == ["alerts.yml"], path.name
    assert 'up{job="verloop-worker"}' in ALERTS.read_text(encoding="utf-8")


# --- metric names -------------------------------------------------------------------------------
def test_metric_names_in_alerts_and_dashboard_exist() -> None:
    verloop = _declared_metrics(ROOT / "worker" / "observability" / "metrics.py")
    dramatiq = _declared_metrics(_dramatiq_prometheus_source())
    message = "could not read the metric declarations of worker/observability/metrics.py"
    assert "verloop_sends_total" in verloop, message
    assert "verloop_api_request_duration_seconds_bucket" in verloop, message
    assert "dramatiq_messages_total" in dramatiq, "could not read dramatiq's metrics"
    known = verloop | dramatiq | RABBITMQ_METRICS
    used = [(f"alert {rule['alert']}", rule["expr"]) for rule in _alert_rules()]
    used += _dashboard_queries()
    found = [(name, where) for where, expr in used for name in METRIC_NAME.findall(expr)]
    assert any(name.startswith("verloop_") for name, _ in found)
    unknown = sorted({f"{name} ({where})" for name, where in found if name not in known})
    assert unknown == [], f"metrics that nothing exports: {unknown}"


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
    assert {"rabbitmq", "redis", "worker", "prometheus", "grafana", "sandbox"} <= set(services)
    for name in ("worker", "sandbox"):
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
    worker = _load_yaml(COMPOSE)["services"]["worker"]
    url = urlsplit(worker["environment"]["AMQP_URL"])
    users = {u["name"]: u for u in json.loads(DEFINITIONS.read_text(encoding="utf-8"))["users"]}
    assert url.username in users, f"{url.username} is not in definitions.json"
    assert _rabbit_password_matches(
        unquote(url.password or ""), users[url.username]["password_hash"]
    )


# --- RabbitMQ definitions -----------------------------------------------------------------------
def test_definitions_declare_the_queues_as_the_worker_does() -> None:
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    queues = {q["name"]: q for q in definitions["queues"]}
    assert set(queues) == set(ALL_QUEUES)
    for main in MAIN_QUEUES:
        # dramatiq declares a queue and its delay queue with the same arguments.
        assert queues[main]["arguments"] == queue_arguments(main)
        assert queues[dq_name(main)]["arguments"] == queue_arguments(main)
        assert queues[xq_name(main)]["arguments"] == {"x-message-ttl": DEAD_MESSAGE_TTL}
    for queue in queues.values():
        assert queue["durable"] is True
        assert queue["auto_delete"] is False
        assert queue["vhost"] == "/"


def test_definitions_make_the_long_queues_lazy_and_leave_the_transactional_queue_alone() -> None:
    """The policy keeps a campaign's millions of jobs (and dead letters) on disk rather than in
    memory (RabbitMQ before 3.12 pages a long in-memory queue out in bulk; from 3.12 classic
    queues behave this way anyway and ignore the key). A real RabbitMQ applies it, the way
    ``make bench`` does, to a vhost of its own, so the check covers RabbitMQ's own pattern
    matching, not just ours."""
    lazy = {CAMPAIGN_QUEUE, dq_name(CAMPAIGN_QUEUE), *(xq_name(q) for q in MAIN_QUEUES)}
    ctl = _tool("rabbitmqctl", "apt-get install -y rabbitmq-server")
    vhost = "verloop-policy-check"
    _run([ctl, "-q", "delete_vhost", vhost])
    _assert_ok(_run([ctl, "-q", "add_vhost", vhost]))
    try:
        _assert_ok(_run([ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]))
        (policy,) = set_deploy_policies(ctl, vhost)
        assert policy["definition"] == {"queue-mode": "lazy"}
        connection = pika.BlockingConnection(
            pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        )
        try:
            channel = connection.channel()
            for queue in ALL_QUEUES:
                channel.queue_declare(queue, durable=True)
        finally:
            connection.close()
        listing = [ctl, "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "policy"]
        listed = _run(listing)
        _assert_ok(listed)
        applied = dict(line.split("\t") for line in listed.stdout.strip().splitlines())
        assert {q for q, name in applied.items() if name == policy["name"]} == lazy
    finally:
        _run([ctl, "-q", "delete_vhost", vhost])


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


def test_definitions_declare_the_jobs_exchange_as_the_worker_does() -> None:
    """Direct, durable, bound to the three job queues by their own names, as
    worker.runtime.jobs_exchange declares it (a mismatch would make RabbitMQ refuse the worker's
    declaration)."""
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    name = Settings.model_fields["jobs_exchange"].default
    [exchange] = [e for e in definitions["exchanges"] if e["name"] == name]
    assert exchange["type"] == "direct"
    assert exchange["durable"] is True
    assert exchange["auto_delete"] is exchange["internal"] is False
    assert exchange["arguments"] == {}
    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in definitions["bindings"]
    }
    assert bindings == {(name, queue, "queue", queue) for queue in JOB_QUEUES}
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
    config = _one(by_kind, "ConfigMap")["data"]
    pod = _one(by_kind, "Deployment")["spec"]["template"]["spec"]
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
    config = _one(by_kind, "ConfigMap")
    secret = _one(by_kind, "Secret")
    container = _one(by_kind, "Deployment")["spec"]["template"]["spec"]["containers"][0]
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
    deployment = _one(by_kind, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one(by_kind, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    assert str(port["port"]) == service["metadata"]["annotations"]["prometheus.io/port"]
    pdb = _one(by_kind, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    scaled = _one(by_kind, "ScaledObject")
    auth = _one(by_kind, "TriggerAuthentication")
    secret = _one(by_kind, "Secret")
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
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "apt-get install -y systemd")
    executable = Path(sys.executable).parent / "verloop-worker"
    assert executable.exists(), f"{executable}: install the project (make install)"
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    assert "/opt/verloop-worker/bin/verloop-worker" in text
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(
        text.replace("/opt/verloop-worker/bin/verloop-worker", str(executable)), encoding="utf-8"
    )
    result = _run([analyze, "verify", str(unit)])
    _assert_ok(result)
    # Unknown keys and other mistakes are only warnings: none is allowed.
    assert result.stdout + result.stderr == "", result.stdout + result.stderr
