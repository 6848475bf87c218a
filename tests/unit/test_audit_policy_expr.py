"""The policy-expression reader: which USING / WITH CHECK texts confine rows to the tenant.

The texts are written the way ``pg_get_expr`` prints them (Postgres deparses every policy
that way before the audit reads it), plus hand-written forms for robustness.
"""

from __future__ import annotations

import pytest

from pgtenant.control.audit.policy_expr import analyse

COLS = ("org_id",)
SIGNED = "( SELECT pgtenant.current_tenant() AS current_tenant)"
RAW = "(current_setting('app.tenant_id'::text))::uuid"


@pytest.mark.parametrize("expr", [
    f"(org_id = {SIGNED})",
    f"({SIGNED} = org_id)",
    f"(org_id = {RAW})",
    "(org_id = pgtenant.current_tenant())",
    f"((org_id = {SIGNED}) AND (status <> 'deleted'::text))",
    f"((org_id = {SIGNED}) OR ((org_id = {RAW}) AND archived))",
    "(org_id IN ( SELECT m.org_id FROM memberships m WHERE (m.org_id = "
    "pgtenant.current_tenant())))",
    "(org_id = ANY (SELECT m.org FROM memberships m WHERE m.org = "
    "current_setting('app.tenant_id')::uuid))",
    "((org_id)::text = current_setting('app.tenant_id'::text, true))",
    "(org_id = app_tenant())",  # a helper whose body reads the context (see below)
    "(org_id = ( SELECT (NULLIF(current_setting('app.tenant_id'::text, true), ''::text))::uuid"
    " AS nullif))",
    "(org_id = (COALESCE(current_setting('app.tenant_id'::text, true), ''::text))::uuid)",
])
def test_tenant_scoped(expr: str) -> None:
    assert analyse(expr, COLS, {"app_tenant"}).constrains, expr


@pytest.mark.parametrize("expr", [
    None,                                       # no expression: no condition at all
    "true",
    f"(id = {SIGNED})",                         # the wrong column
    f"((org_id = {SIGNED}) OR true)",           # an OR with an escape hatch
    f"((org_id = {SIGNED}) OR shared)",
    f"(NOT (org_id = {SIGNED}))",               # every tenant but one
    f"(org_id <> {SIGNED})",
    "(org_id = get_user_org_id())",             # the seed story's helper, not pgtenant's
    "(current_setting('app.tenant_id'::text) IS NOT NULL)",  # reads it, filters nothing
    "(org_id = (current_setting('app.other'::text))::uuid)",
    "(org_id IN ( SELECT o.id FROM orgs o))",   # a sub-select that ignores the tenant
    "(org_id = COALESCE(x, pgtenant.current_tenant()))",  # x first: any value a row has
    "(this is not sql",                         # unparsable: never counted as a check
])
def test_not_tenant_scoped(expr: str | None) -> None:
    assert not analyse(expr, COLS, {"app_tenant"}).constrains, expr


def test_other_tenant_columns() -> None:
    assert analyse(f"(tenant_id = {SIGNED})", ("tenant_id", "org_id")).constrains
    assert not analyse(f"(tenant_id = {SIGNED})", ("org_id",)).constrains


def test_raw_setting_and_per_row_call() -> None:
    signed = analyse(f"(org_id = {SIGNED})", COLS)
    assert not signed.raw_setting and not signed.per_row_call
    raw = analyse(f"(org_id = {RAW})", COLS)
    assert raw.raw_setting and raw.per_row_call
    wrapped = analyse(f"(org_id = ( SELECT {RAW} AS current_setting))", COLS)
    assert wrapped.raw_setting and not wrapped.per_row_call and wrapped.constrains
    bare = analyse("(org_id = pgtenant.current_tenant())", COLS)
    assert bare.per_row_call and not bare.raw_setting


def test_unparsable_is_flagged() -> None:
    facts = analyse("(((", COLS)
    assert not facts.parsed and not facts.constrains
