"""What the cluster checks share: deploy/docker-compose.cluster.yml read the way Compose reads
it (``${VAR:-default}`` and ``$$`` interpolated), and the files its services mount.

There is no Docker engine (nor the Compose plugin) where these tests run, so the file is checked
as data: these helpers do the part of ``docker compose config`` the checks need.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_COMPOSE = DEPLOY / "docker-compose.cluster.yml"
RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
REDIS_SERVERS = ("redis-primary", "redis-replica")
REDIS_SENTINELS = ("redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3")
#: Where the Redis services mount their shipped configuration.
REDIS_CONFIG_TARGET = "/usr/local/etc/redis/redis.conf"

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail(
            "PyYAML is needed to check the deploy/ files: `.venv/bin/pip install pyyaml` "
            "(it is in the `dev` extras of pyproject.toml)"
        )
    return yaml


def interpolate(value: Any, environment: Mapping[str, str]) -> Any:
    """``value`` with Compose's interpolation applied to every string in it: ``$$`` is a
    literal ``$``, ``${NAME:-default}`` is ``NAME`` from ``environment`` if set and not empty,
    else the default; ``${NAME}`` without a default must be in ``environment``."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if environment.get(name):
                return environment[name]
            if default is None:
                pytest.fail(f"${{{name}}} has no default and is not set")
            return default

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate(item, environment) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, environment) for key, item in value.items()}
    return value


def cluster_compose(environment: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The cluster Compose file as Compose sees it with ``environment`` (no variable set: every
    default); YAML anchors and merge keys are resolved by the YAML loader."""
    raw = yaml_module().safe_load(CLUSTER_COMPOSE.read_text(encoding="utf-8"))
    return dict(interpolate(raw, environment or {}))


def mounted_file(service: dict[str, Any], target: str) -> Path:
    """The file of deploy/ that ``service`` bind-mounts at ``target``."""
    for volume in service.get("volumes", []):
        source, mount_target, *_ = volume.split(":")
        if mount_target == target:
            assert source.startswith("./"), f"{target} is not a file of deploy/: {source}"
            return DEPLOY / source
    pytest.fail(f"nothing is mounted at {target}")
