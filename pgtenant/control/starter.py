"""The starter config ``pgtenant init --write-config PATH`` writes.

Owns only the text: a config that serves the database ``init`` just prepared, with the real
passwords of the login and control roles in its dsns, so nobody copies a placeholder into
production. The example config (``pgtenant example-config``) documents every other key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..config import Dsn, TenantTypeConfig

__all__ = ["STARTER_TENANT_TYPES", "starter_config", "write_private"]

# Without --config, init creates these: one shared-schema type (RLS on a tenant column) and
# one schema-per-tenant type (own schema, own role), the two layouts the README shows.
STARTER_TENANT_TYPES: dict[str, TenantTypeConfig] = {
    "shared": TenantTypeConfig(name="shared", role="tenant_shared", search_path=("public",)),
    "isolated": TenantTypeConfig(name="isolated", role="{schema}",
                                 search_path=("{schema}", "public")),
}


def _str(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def starter_config(admin: Dsn, *, proxy_role: str, proxy_password: str, control_role: str,
                   control_password: str, tenant_types: Mapping[str, TenantTypeConfig],
                   listen: str = "127.0.0.1:6432") -> str:
    """Render a config serving ``admin``'s database through the roles ``init`` set up.

    The dsns keep the admin URL's host, port and database, with the login and control roles
    and their passwords instead of the admin's.

    Returns: TOML text accepted by ``pgtenant.configfile.parse_config``.
    """
    proxy_dsn = dataclasses.replace(admin, user=proxy_role, password=proxy_password, params=())
    control_dsn = dataclasses.replace(admin, user=control_role, password=control_password,
                                      params=())
    lines = [
        "# Written by `pgtenant init --write-config`. It holds the passwords of two login",
        "# roles: keep it readable by the proxy's user only. Every other key, with its",
        "# default, is documented in the example config (`pgtenant example-config`).",
        "",
        f"listen = {_str(listen)}",
        "",
        "# The proxy's login role: NOINHERIT, owns nothing; tenant transactions switch to the",
        "# tenant type's role with SET LOCAL ROLE.",
        f"[databases.{_key(admin.dbname)}]",
        f"dsn = {_str(proxy_dsn.to_url())}",
        "pool_size = 20",
        "",
        "# The control role: alone reads the token registry and the context-signing key.",
        "[control]",
        f"dsn = {_str(control_dsn.to_url())}",
        "",
        "# Prometheus /metrics, /healthz and /readyz.",
        "[metrics]",
        '# listen = "127.0.0.1:9127"',
        "",
        "# Admin console (SHOW POOLS, ...): `pgtenant admin-token` prints the line to put here.",
        "[admin]",
        '# token_sha256 = "<64 hex digits>"',
    ]
    for name, tenant_type in tenant_types.items():
        path = ", ".join(_str(p) for p in tenant_type.search_path)
        lines += ["", f"[tenant_types.{_key(name)}]", f"role = {_str(tenant_type.role)}",
                  f"search_path = [{path}]"]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Create ``path`` (and its parent directories) readable by its owner only.

    Raises: FileExistsError when it exists: a config in use is never overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
