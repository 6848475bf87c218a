"""The registry refuses a tenant whose organization is not 'ready' (57P03), and does not
cache the refusal: the tenant logs in the moment its provision finishes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from pgtenant.config import parse_dsn
from pgtenant.identity.registry import Registry, TenantNotReady
from pgtenant.identity.tokens import generate_token


def _registry(rows: list[dict[str, Any] | None]) -> Registry:
    registry = Registry(parse_dsn("postgresql://u@127.0.0.1:1/x"), ttl=60.0)

    async def fetchrow(sql: str, arg: object) -> dict[str, Any] | None:
        return rows.pop(0)

    registry._fetchrow = fetchrow  # type: ignore[method-assign,assignment]
    return registry


def _row(status: str | None) -> dict[str, Any]:
    row = {"token_id": uuid.uuid4(), "org_id": uuid.uuid4(), "slug": "acme",
           "tenant_type": "sme", "schema_name": None, "entity_id": None,
           "database_name": None}
    if status is not None:
        row["status"] = status
    return row


async def test_a_provisioning_tenant_is_refused_with_57p03_then_accepted_once_ready() -> None:
    registry = _registry([_row("provisioning"), _row("ready")])
    token = generate_token()
    with pytest.raises(TenantNotReady, match="being provisioned") as info:
        await registry.resolve(token)
    assert info.value.sqlstate == "57P03"
    identity = await registry.resolve(token)  # not cached: asked again, now ready
    assert identity is not None and identity.slug == "acme"


async def test_a_dropping_tenant_is_refused() -> None:
    registry = _registry([_row("dropping")])
    with pytest.raises(TenantNotReady, match="being dropped"):
        await registry.resolve(generate_token())


async def test_a_control_schema_without_status_counts_every_tenant_ready() -> None:
    registry = _registry([_row(None)])
    assert await registry.resolve(generate_token()) is not None
