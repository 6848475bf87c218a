"""Tenant context rendering, SQL quoting, and the injection bytes built from a context."""

from __future__ import annotations

import re
import struct
import uuid

import pytest

from pgtenant.config import TenantTypeConfig
from pgtenant.errors import ContextError
from pgtenant.identity.context import (
    TenantContext,
    TenantIdentity,
    build_context,
    default_schema_name,
    quote_ident,
    quote_ident_if_needed,
    quote_literal,
    render_template,
)
from pgtenant.protocol import codec
from pgtenant.protocol.inject import (
    CTX_CLOSE,
    CTX_PARSE,
    CTX_SQL,
    CTX_STATEMENT,
    EXECUTE_UNNAMED,
    OMITTABLE,
    Q_DROP,
    Injection,
    injection,
)

ORG = uuid.UUID("11111111-2222-3333-4444-555555555555")
ENTITY = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
TOKEN = uuid.UUID(int=1)


def identity(slug: str = "acme", *, schema: str | None = None,
             entity_id: uuid.UUID | None = None, tenant_type: str = "sme") -> TenantIdentity:
    return TenantIdentity(org_id=ORG, slug=slug, tenant_type=tenant_type, token_id=TOKEN,
                          entity_id=entity_id, schema=schema)


def tenant_type(role: str, *search_path: str) -> TenantTypeConfig:
    return TenantTypeConfig(name="sme", role=role, search_path=search_path or ("public",))


# ---------------------------------------------------------------------- build_context


def test_build_context_renders_role_and_search_path_templates() -> None:
    ctx = build_context(
        identity(schema="t_acme"), tenant_type("tenant_{slug}", "{schema}", "shared_{slug}")
    )
    assert ctx == TenantContext(
        identity=identity(schema="t_acme"),
        role="tenant_acme",
        search_path=("t_acme", "shared_acme"),
    )


def test_build_context_with_plain_names_keeps_them() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    assert (ctx.role, ctx.search_path) == ("tenant_sme", ("public",))


def test_schema_placeholder_without_a_schema_raises_context_error() -> None:
    with pytest.raises(ContextError, match="has no schema") as info:
        build_context(identity(schema=None), tenant_type("{schema}", "{schema}", "public"))
    assert info.value.sqlstate == "42501"


def test_schema_placeholder_in_search_path_only_still_needs_a_schema() -> None:
    with pytest.raises(ContextError, match="search_path template"):
        build_context(identity(schema=None), tenant_type("tenant_sme", "{schema}"))


@pytest.mark.parametrize(
    "slug",
    [
        "Acme",  # upper case
        'ac"me',  # a double quote
        "ac'me",  # a single quote
        "a" * 64,  # longer than NAMEDATALEN - 1
        "1acme",  # leading digit
        "ac-me",  # hyphen
        "ac me",  # space
        "acm\u00e9",  # non-ASCII
        "",  # empty
    ],
)
def test_unsafe_rendered_role_raises_context_error(slug: str) -> None:
    with pytest.raises(ContextError, match="not a lower-case identifier"):
        build_context(identity(slug), tenant_type("{slug}"))


def test_unsafe_rendered_schema_raises_context_error() -> None:
    with pytest.raises(ContextError, match="search_path"):
        build_context(identity(schema="T_Acme"), tenant_type("tenant_sme", "{schema}"))


def test_longest_safe_name_is_63_characters() -> None:
    assert render_template("{slug}", identity("a" * 63), what="role") == "a" * 63


def test_rendered_name_with_trailing_newline_raises_context_error() -> None:
    with pytest.raises(ContextError):
        render_template("{slug}", identity("acme\n"), what="role")


def test_org_id_placeholder_renders_a_safe_name() -> None:
    ctx = build_context(identity(), tenant_type("t_{org_id}"))
    assert ctx.role.startswith("t_")


@pytest.mark.parametrize("template", ["{slug!z}", "{slug:d}"])
def test_template_format_failure_raises_context_error(template: str) -> None:
    with pytest.raises(ContextError):
        render_template(template, identity(), what="role")


def test_default_schema_name_is_t_and_sanitized_slug() -> None:
    assert default_schema_name("acme") == "t_acme"
    assert default_schema_name("Acme-Corp.eu") == "t_acme_corp_eu"


# ---------------------------------------------------------------------- quoting


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("public", '"public"'), ('a"b', '"a""b"'), ('""', '""""""'), ("", '""'), ("a b", '"a b"')],
)
def test_quote_ident_doubles_double_quotes(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("sme", "'sme'"),
        ("O'Brien", "'O''Brien'"),
        ("''", "''''''"),
        ("", "''"),
        ("a\\b", "'a\\b'"),  # standard_conforming_strings: backslash is not special
    ],
)
def test_quote_literal_doubles_single_quotes(value: str, quoted: str) -> None:
    assert quote_literal(value) == quoted


def test_quote_literal_refuses_nul() -> None:
    with pytest.raises(ContextError, match="NUL"):
        quote_literal("a\x00b")


# ---------------------------------------------------------------------- context values


def test_gucs_are_in_injection_order_with_empty_entity_when_absent() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    assert ctx.gucs == (
        ("app.tenant_id", "11111111-2222-3333-4444-555555555555"),
        ("app.tenant_type", "sme"),
        ("app.entity_id", ""),
    )


def test_gucs_carry_the_entity_when_present() -> None:
    ctx = build_context(identity(entity_id=ENTITY), tenant_type("tenant_sme"))
    assert dict(ctx.gucs)["app.entity_id"] == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def test_search_path_value_is_spelled_as_postgres_prints_it() -> None:
    ctx = build_context(identity(schema="t_acme"), tenant_type("r", "{schema}", "public"))
    assert ctx.search_path_value == "t_acme, public"


def test_search_path_value_quotes_keywords() -> None:
    ctx = build_context(identity(), tenant_type("r", "user", "public"))
    assert ctx.search_path_value == '"user", public'


@pytest.mark.parametrize(
    ("name", "spelled"),
    [
        ("public", "public"),
        ("t_acme", "t_acme"),
        ("_x1", "_x1"),
        ("role", "role"),  # unreserved keyword
        ("user", '"user"'),  # reserved
        ("select", '"select"'),  # reserved
        ("int", '"int"'),  # col_name keyword
        ("authorization", '"authorization"'),  # type_func_name keyword
        ("Acme", '"Acme"'),
        ("1a", '"1a"'),
        ('a"b', '"a""b"'),
    ],
)
def test_quote_ident_if_needed_follows_postgres_quote_identifier(name: str, spelled: str) -> None:
    assert quote_ident_if_needed(name) == spelled


def test_quote_ident_if_needed_quotes_a_dollar_sign() -> None:
    assert quote_ident_if_needed("a$b") == '"a$b"'


# ---------------------------------------------------------------------- Injection


def test_injection_prefix_without_entity_is_exact() -> None:
    inj = Injection(build_context(identity(), tenant_type("tenant_sme")))
    expected = (
        "SET LOCAL app.tenant_id = '11111111-2222-3333-4444-555555555555'; "
        "SET LOCAL app.tenant_type = 'sme'; "
        "SET LOCAL app.entity_id = ''; "
        "SET LOCAL app.tenant_sig = ''; "
        "SET LOCAL search_path = public; "
        "SET LOCAL ROLE 'tenant_sme';"
    )
    assert inj.q_prefix == expected.encode()
    assert inj.q_shift == len(inj.q_prefix) == len(expected)
    assert inj.q_prefix.isascii()


def test_injection_prefix_with_entity_and_schema_is_exact() -> None:
    ctx = build_context(
        identity(schema="t_acme", entity_id=ENTITY), tenant_type("{schema}", "{schema}", "public")
    )
    inj = Injection(ctx)
    expected = (
        "SET LOCAL app.tenant_id = '11111111-2222-3333-4444-555555555555'; "
        "SET LOCAL app.tenant_type = 'sme'; "
        "SET LOCAL app.entity_id = 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee'; "
        "SET LOCAL app.tenant_sig = ''; "
        "SET LOCAL search_path = t_acme, public; "
        "SET LOCAL ROLE 't_acme';"
    )
    assert inj.q_prefix == expected.encode()
    assert inj.q_shift == len(inj.q_prefix)
    assert inj.q_prefix.isascii()


def test_injection_prefix_quotes_keyword_schemas_like_postgres_prints_them() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme", "user", "public"))
    assert b"SET LOCAL search_path = \"user\", public;" in Injection(ctx).q_prefix


def test_injection_prefix_escapes_quotes_in_values() -> None:
    inj = Injection(build_context(identity(tenant_type="o'x"), tenant_type("tenant_sme")))
    assert b"SET LOCAL app.tenant_type = 'o''x';" in inj.q_prefix


def test_injection_prefix_replies_are_six_fixed_set_completes() -> None:
    inj = Injection(build_context(identity(entity_id=ENTITY), tenant_type("tenant_sme")))
    assert inj.q_prefix.count(b"SET LOCAL ") == 6 and inj.q_prefix.count(b";") == 6
    assert inj.q_prefix.endswith(b";")
    assert inj.q_drop == 6
    assert inj.q_reply == b"C\x00\x00\x00\x08SET\x00" * 6
    assert Q_DROP == 3  # the session form's SELECT: RowDescription, DataRow, CommandComplete


def test_set_config_form_is_one_select_with_three_dropped_replies() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    inj = Injection(ctx, set_local=False).with_settings((("TimeZone", "UTC"),))
    assert inj.q_prefix == (
        b"SELECT pg_catalog.set_config('app.tenant_id', "
        b"'11111111-2222-3333-4444-555555555555', true), "
        b"pg_catalog.set_config('app.tenant_type', 'sme', true), "
        b"pg_catalog.set_config('app.entity_id', '', true), "
        b"pg_catalog.set_config('app.tenant_sig', '', true), "
        b"pg_catalog.set_config('TimeZone', 'UTC', true), "
        b"pg_catalog.set_config('search_path', 'public', true), "
        b"pg_catalog.set_config('role', 'tenant_sme', true);")
    assert (inj.q_drop, inj.q_reply, inj.q_shift) == (Q_DROP, b"", len(inj.q_prefix))


def test_list_quoted_and_extension_settings_go_through_set_config() -> None:
    # SET would read 'a, b' as one quoted tablespace name; an extension's setting may be
    # list-quoted too. set_config takes both verbatim, as the client's own SET recorded them.
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    inj = Injection(ctx).with_settings((("temp_tablespaces", "a, b"), ("ext.list", "x")))
    assert (b"SELECT pg_catalog.set_config('temp_tablespaces', 'a, b', true); "
            b"SELECT pg_catalog.set_config('ext.list', 'x', true); ") in inj.q_prefix
    assert inj.q_drop == 6 + 2 * Q_DROP and inj.q_reply == b""  # their DataRows vary


KEY = b"k" * 32


def test_omitted_empty_values_leave_four_set_locals() -> None:
    """Issue 16: with the login role's '' defaults in force, a tenant without entity and a
    proxy without signing send 4 statements; their replies are 4 fixed SET completes."""
    inj = Injection(build_context(identity(), tenant_type("tenant_sme")), omit=OMITTABLE)
    expected = (
        "SET LOCAL app.tenant_id = '11111111-2222-3333-4444-555555555555'; "
        "SET LOCAL app.tenant_type = 'sme'; "
        "SET LOCAL search_path = public; "
        "SET LOCAL ROLE 'tenant_sme';"
    )
    assert inj.q_prefix == expected.encode()
    assert (inj.q_drop, inj.q_shift) == (4, len(expected))
    assert inj.q_reply == b"C\x00\x00\x00\x08SET\x00" * 4


@pytest.mark.parametrize(("entity_id", "key", "kept"), [
    (ENTITY, None, [b"app.entity_id = 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee'"]),
    (None, KEY, [b"app.tenant_sig = '"]),
    (ENTITY, KEY, [b"app.entity_id = 'aaaa", b"app.tenant_sig = '"]),
], ids=["entity", "signed", "both"])
def test_only_empty_values_are_omitted(entity_id: uuid.UUID | None, key: bytes | None,
                                       kept: list[bytes]) -> None:
    ctx = build_context(identity(entity_id=entity_id), tenant_type("tenant_sme"))
    inj = Injection(ctx, key, omit=OMITTABLE)
    assert inj.q_prefix.count(b"SET LOCAL ") == inj.q_drop == 4 + len(kept)
    for part in kept:
        assert b"SET LOCAL " + part in inj.q_prefix
    full = Injection(ctx, key)
    assert (inj.ext_bind, inj.q_session, inj.signature) == (
        full.ext_bind, full.q_session, full.signature)


def test_omit_never_drops_other_names_nor_changes_the_extended_or_session_forms() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    full = Injection(ctx)
    inj = Injection(ctx, omit=frozenset({"app.tenant_id", "app.tenant_type", "search_path",
                                         "app.entity_id"}))
    assert inj.q_prefix == full.q_prefix.replace(b"SET LOCAL app.entity_id = ''; ", b"")
    # The extended form keeps its eight parameters ('' included): the same Bind bytes.
    assert inj.ext_bind == full.ext_bind and inj.q_session == full.q_session
    assert b"pg_catalog.set_config('app.entity_id', '', false)" in inj.q_session


def test_omit_applies_to_the_set_config_form_and_survives_with_settings() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    inj = injection(ctx, set_local=False, omit=OMITTABLE).with_settings((("TimeZone", "UTC"),))
    assert inj.q_prefix == (
        b"SELECT pg_catalog.set_config('app.tenant_id', "
        b"'11111111-2222-3333-4444-555555555555', true), "
        b"pg_catalog.set_config('app.tenant_type', 'sme', true), "
        b"pg_catalog.set_config('TimeZone', 'UTC', true), "
        b"pg_catalog.set_config('search_path', 'public', true), "
        b"pg_catalog.set_config('role', 'tenant_sme', true);")
    assert injection(ctx, omit=OMITTABLE) is injection(ctx, omit=OMITTABLE)
    assert injection(ctx, omit=OMITTABLE) is not injection(ctx)


def decode_bind(msg: bytes) -> tuple[str, str, list[int], list[bytes | None], list[int]]:
    """Decode a Bind by hand: (portal, statement, param formats, values, result formats)."""
    assert msg[:1] == b"B"
    (length,) = struct.unpack_from("!i", msg, 1)
    assert length == len(msg) - 1
    body = msg[5:]
    portal_end = body.index(b"\x00")
    portal = body[:portal_end].decode()
    stmt_end = body.index(b"\x00", portal_end + 1)
    statement = body[portal_end + 1 : stmt_end].decode()
    pos = stmt_end + 1
    (n_formats,) = struct.unpack_from("!h", body, pos)
    formats = list(struct.unpack_from(f"!{n_formats}h", body, pos + 2))
    pos += 2 + 2 * n_formats
    (n_params,) = struct.unpack_from("!h", body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(n_params):
        (size,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + size])
            pos += size
    (n_results,) = struct.unpack_from("!h", body, pos)
    results = list(struct.unpack_from(f"!{n_results}h", body, pos + 2))
    pos += 2 + 2 * n_results
    assert pos == len(body), "trailing bytes in Bind"
    return portal, statement, formats, values, results


@pytest.mark.parametrize("entity_id", [None, ENTITY], ids=["no entity", "entity"])
def test_ext_bind_decodes_to_eight_text_params_in_documented_order(
    entity_id: uuid.UUID | None,
) -> None:
    ctx = build_context(
        identity(schema="t_acme", entity_id=entity_id),
        tenant_type("{schema}", "{schema}", "public"),
    )
    portal, statement, formats, values, results = decode_bind(Injection(ctx).ext_bind)
    assert (portal, statement) == ("", CTX_STATEMENT)
    assert formats == [] and results == []  # all text
    assert values == [
        b"11111111-2222-3333-4444-555555555555",  # $1 app.tenant_id
        b"sme",  # $2 app.tenant_type
        b"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" if entity_id else b"",  # $3 app.entity_id
        b"",  # $4 app.tenant_sig (no signing key)
        b"{}",  # $5 the client's setting names
        b"{}",  # $6 and values
        b"t_acme, public",  # $7 search_path
        b"t_acme",  # $8 role
    ]


def test_context_statement_sets_the_parameters_in_bind_order() -> None:
    names = {1: "app.tenant_id", 2: "app.tenant_type", 3: "app.entity_id",
             4: "app.tenant_sig", 7: "search_path", 8: "role"}
    positions = [CTX_SQL.index(f"set_config('{name}', ${i}, true)") for i, name in
                 names.items()]
    positions.insert(4, CTX_SQL.index("set_config(s.n, s.v, true)"))  # $5/$6: settings
    names = list(names.values())
    assert positions == sorted(positions)
    assert names[-1] == "role"  # the role switch comes last


def test_context_parse_close_and_execute_bytes() -> None:
    sql = CTX_SQL.encode()
    name = CTX_STATEMENT.encode()
    assert re.fullmatch(rb"__pgtenant_ctx_[0-9a-f]{16}", name)  # unguessable per process
    body = name + b"\x00" + sql + b"\x00" + b"\x00\x08" + b"\x00\x00\x00\x19" * 8
    assert body == CTX_PARSE[5:]
    assert CTX_PARSE[:5] == b"P" + struct.pack("!i", len(body) + 4)
    assert CTX_CLOSE == b"C" + struct.pack("!i", len(name) + 6) + b"S" + name + b"\x00"
    assert EXECUTE_UNNAMED == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"


def test_signed_injection_carries_the_hmac_of_the_context_in_both_forms() -> None:
    import hashlib
    import hmac

    key = b"k" * 32
    ctx = build_context(identity(entity_id=ENTITY), tenant_type("tenant_sme"))
    inj = Injection(ctx, signing_key=key)
    message = f"11111111-2222-3333-4444-555555555555|sme|{ENTITY}".encode()
    expected = hmac.new(key, message, hashlib.sha256).hexdigest()
    assert inj.signature == expected
    assert f"SET LOCAL app.tenant_sig = '{expected}';".encode() in inj.q_prefix
    assert f"set_config('app.tenant_sig', '{expected}', false)".encode() in inj.q_session
    assert decode_bind(inj.ext_bind)[3][3] == expected.encode()


def test_client_settings_travel_in_both_injection_forms() -> None:
    ctx = build_context(identity(), tenant_type("tenant_sme"))
    inj = Injection(ctx).with_settings((("TimeZone", "Asia/Tokyo"), ("application_name", 'a"b')))
    assert (b"SET LOCAL app.tenant_sig = ''; "
            b"SET LOCAL \"TimeZone\" = 'Asia/Tokyo'; "
            b"SET LOCAL \"application_name\" = 'a\"b'; "
            b"SET LOCAL search_path = public;") in inj.q_prefix
    assert inj.q_shift == len(inj.q_prefix.decode())
    assert inj.q_drop == 8 and inj.q_reply == codec.command_complete("SET") * 8
    assert b", false)" in inj.q_session and b", true)" not in inj.q_session
    values = decode_bind(inj.ext_bind)[3]
    assert values[4:6] == [b'{"TimeZone","application_name"}', b'{"Asia/Tokyo","a\\"b"}']
