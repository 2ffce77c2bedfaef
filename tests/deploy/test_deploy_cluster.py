"""The multi-node deployment files: deploy/docker-compose.cluster.yml and what it mounts
(deploy/rabbitmq/cluster/, deploy/redis/), and the Kubernetes notes' manifests in
deploy/k8s/cluster/.

No Docker engine or Compose plugin is available here, so the Compose file is checked as data
(tests/deploy/cluster_files.py interpolates it as Compose does); the Redis files are started for
real in test_cluster_redis.py. RabbitMQ's configuration is checked key by key against the
cuttlefish schema of the RabbitMQ installed on this machine (every key RabbitMQ accepts is a
``{mapping, "key", ...}`` there; an unknown key stops a node at boot), without starting a node.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from tests.deploy.cluster_files import (
    DEPLOY,
    RABBITMQ_NODES,
    REDIS_CONFIG_TARGET,
    REDIS_SENTINELS,
    REDIS_SERVERS,
    cluster_compose,
    mounted_file,
    yaml_module,
)
from tests.deploy.test_deploy_files import _rabbit_password_matches
from worker.connections.amqp import split_amqp_urls
from worker.settings import Settings

SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
CLUSTER_DEFINITIONS = DEPLOY / "rabbitmq" / "cluster" / "definitions.json"
K8S_CLUSTER = DEPLOY / "k8s" / "cluster"
#: Where the installed RabbitMQ keeps its plugins' cuttlefish schemas (Debian's package; the
#: generic Unix build under $RABBITMQ_HOME).
RABBITMQ_SCHEMA_GLOBS = (
    "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/*/priv/schema/*.schema",
    "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/*/priv/*.schema",
    "/opt/rabbitmq/plugins/*/priv/schema/*.schema",
)
_MAPPING = re.compile(r'\{mapping,\s*"([^"]+)"\s*,\s*"[^"]*"\s*,(.*?)\}\s*\.', re.DOTALL)


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = cluster_compose()["services"]
    return services


def _url_password(url: str) -> str:
    return unquote(urlsplit(url).password or "")


def _after(command: list[str], *flag: str) -> str:
    """The value that follows ``flag`` (one or more words) in a command line."""
    n = len(flag)
    for i in range(len(command) - n):
        if tuple(command[i : i + n]) == flag:
            return command[i + n]
    pytest.fail(f"{' '.join(flag)} is not in {command}")


def _plugins(path: Path) -> set[str]:
    """An enabled_plugins file: an Erlang list of atoms, ``[a,b].``."""
    text = path.read_text(encoding="utf-8").strip()
    assert re.fullmatch(r"\[[a-z0-9_]+(,[a-z0-9_]+)*\]\.", text), text
    return set(text[1:-2].split(","))


def _conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format): ``key = value`` lines, comments and blank lines."""
    entries: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, equals, value = line.partition("=")
        assert equals, f"{path.name}: not a key = value line: {line!r}"
        assert key.strip() not in entries, f"{path.name}: {key.strip()} twice"
        entries[key.strip()] = value.strip()
    return entries


def _rabbitmq_schema() -> dict[str, str]:
    """Every configuration key of the installed RabbitMQ (``$name`` is any one word) → the
    rest of its mapping (its datatype)."""
    files = [p for pattern in RABBITMQ_SCHEMA_GLOBS for p in Path("/").glob(pattern.lstrip("/"))]
    if not files:
        pytest.fail(
            "RabbitMQ's configuration schema was not found (looked in "
            f"{', '.join(RABBITMQ_SCHEMA_GLOBS)}): apt-get install rabbitmq-server"
        )
    schema: dict[str, str] = {}
    for path in files:
        for key, rest in _MAPPING.findall(path.read_text(encoding="utf-8", errors="replace")):
            schema[key] = " ".join(rest.split())
    return schema


def _schema_entry(schema: dict[str, str], key: str) -> str | None:
    words = key.split(".")
    for pattern, rest in schema.items():
        parts = pattern.split(".")
        if len(parts) == len(words) and all(
            p.startswith("$") or p == w for p, w in zip(parts, words, strict=True)
        ):
            return rest
    return None


# --- Compose ------------------------------------------------------------------------------------
def test_cluster_compose_has_the_services_and_existing_mounts() -> None:
    compose = cluster_compose()
    services = compose["services"]
    expected = {*RABBITMQ_NODES, "rabbitmq-cluster", *REDIS_SERVERS, *REDIS_SENTINELS}
    assert expected | {"worker", "webhooks", "sandbox"} == set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name}: {source} does not exist"
    (cookie,) = compose["secrets"].values()
    cookie_file = DEPLOY / cookie["file"]
    assert cookie_file.is_file()
    # Erlang reads the cookie as one word of printable characters.
    assert re.fullmatch(r"[!-~]{16,255}", cookie_file.read_text(encoding="utf-8"))
    # The single-node file's conventions: the image's build, the simulator under its profile.
    for name in ("worker", "webhooks", "sandbox"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["sandbox"]["profiles"] == ["sandbox"]


def test_cluster_compose_runs_three_rabbitmq_nodes_of_one_cluster() -> None:
    services = _services()
    nodes = [services[name] for name in RABBITMQ_NODES]
    # One version for the whole cluster, one node name each.
    assert len({node["image"] for node in nodes}) == 1
    assert nodes[0]["image"].startswith("rabbitmq:3")
    assert [node["hostname"] for node in nodes] == list(RABBITMQ_NODES)
    conf = _conf(mounted_file(nodes[0], "/etc/rabbitmq/conf.d/30-cluster.conf"))
    listed = sorted(v for k, v in conf.items() if k.startswith("cluster_formation.classic_config"))
    assert listed == [f"rabbit@{node['hostname']}" for node in nodes]
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    management = 0
    for name, node in zip(RABBITMQ_NODES, nodes, strict=True):
        for target in (
            "/etc/rabbitmq/conf.d/20-verloop.conf",
            "/etc/rabbitmq/conf.d/30-cluster.conf",
        ):
            mounted_file(node, target)  # every node has both
        assert mounted_file(node, "/etc/rabbitmq/definitions.json") == CLUSTER_DEFINITIONS, name
        plugins = _plugins(mounted_file(node, "/etc/rabbitmq/enabled_plugins"))
        assert "rabbitmq_prometheus" in plugins, name
        management += "rabbitmq_management" in plugins
        # The cookie is installed from the shared secret before the image's entrypoint runs.
        assert node["secrets"] == ["rabbitmq-erlang-cookie"]
        assert "/run/secrets/rabbitmq-erlang-cookie" in node["entrypoint"][2]
        assert "exec docker-entrypoint.sh" in node["entrypoint"][2]
    assert management == 1, "the management plugin runs on one node"
    # The worker and the receiver start once the three nodes are one cluster.
    ready = services["rabbitmq-cluster"]
    assert _after(ready["command"], "await_online_nodes") == str(len(RABBITMQ_NODES))
    assert _after(ready["command"], "--node") == f"rabbit@{RABBITMQ_NODES[0]}"
    for name in ("worker", "webhooks"):
        condition = services[name]["depends_on"]["rabbitmq-cluster"]["condition"]
        assert condition == "service_completed_successfully", name


def test_cluster_compose_worker_settings_match_the_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's environment is valid settings (read as in its container) that name the
    services of the file: every RabbitMQ node with a user of definitions.json, the sentinels on
    their port with their password, the service name sentinel.conf monitors."""
    services = _services()
    worker = services["worker"]
    environment = worker["environment"]
    assert set(environment) <= SETTING_NAMES, set(environment) - SETTING_NAMES
    for name in (*SETTING_NAMES, "VERLOOP_WORKER_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings.load()
    assert settings.queue_type == "quorum"
    assert settings.ledger_durability == "replica"
    assert float(str(worker["stop_grace_period"]).removesuffix("s")) > settings.shutdown_timeout_s

    users = {u["name"]: u for u in json.loads(DEFINITIONS.read_text(encoding="utf-8"))["users"]}
    for service, user in (("worker", "verloop-worker"), ("webhooks", "verloop-webhooks")):
        service_environment = services[service]["environment"]
        assert set(service_environment) <= SETTING_NAMES
        urls = split_amqp_urls(service_environment["AMQP_URL"])
        assert sorted(urlsplit(u).hostname or "" for u in urls) == list(RABBITMQ_NODES), service
        for url in urls:
            assert urlsplit(url).username == user
            assert urlsplit(url).port == 5672
            assert _rabbit_password_matches(_url_password(url), users[user]["password_hash"])

    sentinel_conf = mounted_file(services[REDIS_SENTINELS[0]], REDIS_CONFIG_TARGET)
    text = sentinel_conf.read_text(encoding="utf-8")
    port = int(re.search(r"^port (\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    monitor = re.search(r"^sentinel monitor (\S+) (\S+) (\d+) (\d+)$", text, re.MULTILINE)
    assert monitor is not None
    assert settings.sentinel_addresses == [(name, port) for name in REDIS_SENTINELS]
    assert settings.redis_sentinel_service == monitor.group(1)
    assert monitor.group(2) == "redis-primary"
    assert int(monitor.group(4)) == len(REDIS_SENTINELS) // 2 + 1  # a majority
    redis_password = _url_password(settings.redis_url.get_secret_value())
    assert settings.redis_sentinel_password is not None
    sentinel_password = settings.redis_sentinel_password.get_secret_value()
    for name in REDIS_SERVERS:
        command = services[name]["command"]
        assert _after(command, "--requirepass") == _after(command, "--masterauth") == redis_password
    for name in REDIS_SENTINELS:
        command = services[name]["command"]
        assert command[0] == "--sentinel"
        assert _after(command, "--requirepass") == sentinel_password
        assert _after(command, "--sentinel", "sentinel-pass") == sentinel_password
        assert _after(command, "--sentinel", "auth-pass", monitor.group(1)) == redis_password
        assert _after(command, "--sentinel", "announce-ip") == name
    # Passwords reach the servers from the environment, never from the shipped files.
    for name in (*REDIS_SERVERS, *REDIS_SENTINELS):
        shipped = mounted_file(services[name], REDIS_CONFIG_TARGET).read_text(encoding="utf-8")
        password = r"^\s*(requirepass|masterauth|sentinel (auth-pass|sentinel-pass))\b"
        assert not re.search(password, shipped, re.MULTILINE), name
    for name in REDIS_SERVERS:
        shipped = mounted_file(services[name], REDIS_CONFIG_TARGET).read_text(encoding="utf-8")
        assert f"replica-announce-ip {name}\n" in shipped


# --- RabbitMQ -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [DEPLOY / "rabbitmq" / "rabbitmq.conf", DEPLOY / "rabbitmq" / "cluster" / "rabbitmq.conf"],
    ids=["rabbitmq.conf", "cluster/rabbitmq.conf"],
)
def test_rabbitmq_conf_keys_and_values_are_rabbitmq_s(path: Path) -> None:
    """Both files every cluster node loads: each key is one the installed RabbitMQ knows (its
    version may be older than the image's; RabbitMQ keeps its keys across versions), each value
    of the datatype the schema gives."""
    schema = _rabbitmq_schema()
    for key, value in _conf(path).items():
        entry = _schema_entry(schema, key)
        assert entry is not None, f"{path.name}: {key} is not a RabbitMQ setting"
        if "{datatype, integer}" in entry:
            assert re.fullmatch(r"[0-9]+", value), f"{key} = {value}: not an integer"
        enum = re.search(r"\{datatype,\s*\{enum,\s*\[([^\]]*)\]\}\}", entry)
        if enum:
            allowed = {v.strip() for v in enum.group(1).split(",")}
            assert value in allowed, f"{key} = {value}: not one of {sorted(allowed)}"
        if "{datatype, atom}" in entry:
            assert re.fullmatch(r"[a-z][A-Za-z0-9_@.-]*", value), f"{key} = {value}: not an atom"


def test_cluster_definitions_are_the_single_node_ones_without_queues() -> None:
    """Users, permissions, policies (the quorum ones among them) and exchanges as on one node.
    No queues or bindings: definitions load when the first node starts, before the others have
    joined, and a quorum queue declared then would live on that node alone; the worker declares
    the queues, with their quorum arguments, and binds them once the three nodes are up."""
    single = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    cluster = json.loads(CLUSTER_DEFINITIONS.read_text(encoding="utf-8"))
    assert cluster["queues"] == []
    assert cluster["bindings"] == []
    for key in set(single) | set(cluster):
        if key not in ("queues", "bindings"):
            assert cluster.get(key) == single.get(key), f"{key} differs from definitions.json"
    policies = {p["name"] for p in cluster["policies"]}
    assert {"verloop-quorum-work-queues", "verloop-quorum-dead-letters"} <= policies


# --- Kubernetes ---------------------------------------------------------------------------------
def _k8s_cluster_documents(name: str) -> list[dict[str, Any]]:
    text = (K8S_CLUSTER / name).read_text(encoding="utf-8")
    return [doc for doc in yaml_module().safe_load_all(text) if doc]


def test_k8s_cluster_manifests_parse_and_carry_the_quorum_policies() -> None:
    docs = _k8s_cluster_documents("rabbitmq.yaml")
    (cluster,) = [d for d in docs if d["kind"] == "RabbitmqCluster"]
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    assert cluster["spec"]["replicas"] == 3
    assert cluster["spec"]["image"] == _services()["rabbitmq-1"]["image"]
    policies = {d["spec"]["name"]: d["spec"] for d in docs if d["kind"] == "Policy"}
    shipped = {
        p["name"]: p
        for p in json.loads(DEFINITIONS.read_text(encoding="utf-8"))["policies"]
        if p["name"].startswith("verloop-quorum-")
    }
    assert set(policies) == set(shipped)
    for name, policy in policies.items():
        assert policy["rabbitmqClusterReference"] == {"name": cluster["metadata"]["name"]}
        assert (policy["pattern"], policy["definition"], policy["priority"]) == (
            shipped[name]["pattern"],
            shipped[name]["definition"],
            shipped[name]["priority"],
        )
        assert policy["applyTo"] == shipped[name]["apply-to"]
        assert policy["vhost"] == shipped[name]["vhost"]


def test_k8s_cluster_redis_values_and_worker_overlay_agree() -> None:
    (values,) = _k8s_cluster_documents("redis-values.yaml")
    assert values["architecture"] == "replication"
    assert values["sentinel"]["enabled"] is True
    assert values["auth"]["sentinel"] is True
    config = values["commonConfiguration"].splitlines()
    assert {"min-replicas-to-write 1", "min-replicas-max-lag 10"} <= set(config)
    assert "maxmemory-policy noeviction" in config

    (kustomization,) = _k8s_cluster_documents("kustomization.yaml")
    assert kustomization["resources"] == [".."]
    patches = [_k8s_cluster_documents(p["path"]) for p in kustomization["patches"]]
    by_kind = {doc["kind"]: doc for docs in patches for doc in docs}
    settings = by_kind["ConfigMap"]["data"]
    assert by_kind["ConfigMap"]["metadata"]["name"] == "verloop-worker"
    assert set(settings) <= SETTING_NAMES, set(settings) - SETTING_NAMES
    assert settings["QUEUE_TYPE"] == "quorum"
    assert settings["LEDGER_DURABILITY"] == "replica"
    assert settings["REDIS_SENTINEL_SERVICE"] == values["sentinel"]["masterSet"]
    sentinels = Settings(redis_sentinels=settings["REDIS_SENTINELS"]).sentinel_addresses
    assert len(sentinels) == values["replica"]["replicaCount"]
    assert {port for _, port in sentinels} == {26379}
    (container,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "worker"
    assert [e["name"] for e in container["env"]] == ["REDIS_SENTINEL_PASSWORD"]
