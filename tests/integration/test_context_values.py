"""Issue 16, lever 3: the context values policies read, and who can change them.

A proxy with ONE server, so the attacker's and the victim's transactions share a backend;
every test checks the VICTIM's next transaction as well as what the attacker got.

A function body runs later, where the statement guard cannot look: before the guard judged
bodies at CREATE, a tenant of a type with temp_tables made a ``pg_temp`` LANGUAGE sql
function running ``SET ROLE`` to another tenant's role (the login role is a member of every
tenant role) and read that tenant's schema in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgtenant.control.demo import DemoEnv
from pgtenant.protocol import codec

from .conftest import ProxyProcess
from .helpers import TenantRaw as Raw
from .helpers import errors
from .test_attacks_state import rows_text

ATTACKER = "acme"  # sme: role tenant_sme, temp_tables allowed (the default)
VICTIM = "initech"  # same type and role
READ_HOOLI = "SELECT current_user, string_agg(name, ',') FROM t_hooli.projects"
CONTEXT = ("SELECT current_user, current_setting('app.tenant_id', true), "
           "current_setting('app.entity_id', true), current_setting('search_path'), "
           "pg_backend_pid()")


@pytest.fixture(scope="module")
def solo(demo_env: DemoEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(demo_env, tmp_path_factory.mktemp("context_values"), pool_size=1,
                        extra="auth_failure_delay = 0.0")
    yield proc
    proc.check_invariants(proc.stop())


async def _context(proxy: ProxyProcess, slug: str) -> list[str]:
    raw = await Raw.login(proxy, slug)
    try:
        got = await raw.request(codec.query(CONTEXT))
        assert not errors(got), errors(got)
        return rows_text(got)[0]
    finally:
        await raw.close()


@pytest.mark.parametrize("body", [
    "$$ SET ROLE t_hooli; SELECT current_user::text $$",
    "E'\\x53ET ROLE t_hooli; SELECT current_user::text'",  # no SET in the text itself
    "$$ SET app.entity_id = 'forged'; SELECT current_user::text $$",
    "$$ SET app.tenant_id = '00000000-0000-0000-0000-000000000000'; SELECT ''::text $$",
    "$$ SET search_path = t_hooli; SELECT current_user::text $$",
])
async def test_a_function_body_cannot_switch_role_or_context(solo: ProxyProcess,
                                                            body: str) -> None:
    raw = await Raw.login(solo, ATTACKER)
    try:
        got = await raw.request(codec.query(
            f"CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS {body}"))
        assert [e["C"] for e in errors(got)] == ["42501"], errors(got)
        assert "is not allowed in tenant sessions" in errors(got)[0]["M"]
        got = await raw.request(codec.query(f"SELECT pg_temp.g(); {READ_HOOLI}"))
        assert errors(got) and "hooli" not in str(rows_text(got))
        got = await raw.request(codec.query(CONTEXT))
        assert not errors(got), errors(got)
        user, _, entity, path, attacker_pid = rows_text(got)[0]
        assert (user, entity, path) == ("tenant_sme", "", "public")
    finally:
        await raw.close()
    victim = await _context(solo, VICTIM)
    assert victim == ["tenant_sme", str(solo.env.tenants[VICTIM].org_id), "", "public",
                      attacker_pid]
