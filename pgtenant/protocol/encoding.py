"""Client encodings: which ones pgtenant can serve, and their canonical names.

Postgres converts each message's text from the session's client_encoding to the server
encoding before it parses it. The statement guard reads the same bytes as UTF-8, which
agrees with Postgres on every statement's *structure* (keywords, quotes, operators,
identifiers' ASCII spelling) exactly when an ASCII byte is always an ASCII character in the
client's encoding: true of every encoding Postgres allows as a server encoding, since their
multibyte characters use only bytes >= 0x80. Non-ASCII characters can then only sit inside
identifiers or literals, where they cannot spell a refused name. The client-only encodings
(SJIS, BIG5, GBK, UHC, GB18030, JOHAB) put ASCII bytes such as ``\\`` and ``'`` inside
multibyte characters, so the same bytes could be a literal to the guard and a statement to
Postgres: those are refused.

Names are compared as Postgres does (encnames.c: lower case, alphanumerics only).
"""

from __future__ import annotations

from typing import Final

__all__ = ["UNSAFE", "canonical", "encoding_key"]


def encoding_key(name: str) -> str:
    """Returns: an encoding name as Postgres compares them, e.g. "Shift-JIS" -> "shiftjis"."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


# Client-only encodings whose multibyte characters may contain ASCII bytes (see above).
UNSAFE: Final = frozenset({
    "sjis", "shiftjis", "mskanji", "win932", "windows932", "shiftjis2004", "big5", "win950",
    "windows950", "gbk", "win936", "windows936", "cp936", "uhc", "win949", "windows949",
    "gb18030", "johab",
})

# Every other name Postgres accepts (encnames.c), by key, with the name Postgres reports in
# ParameterStatus. MULE_INTERNAL is left out: Postgres has no conversion to it from UTF8.
_CANONICAL: Final[dict[str, str]] = {
    "utf8": "UTF8", "unicode": "UTF8", "sqlascii": "SQL_ASCII",
    "eucjp": "EUC_JP", "euccn": "EUC_CN", "euckr": "EUC_KR", "euctw": "EUC_TW",
    "eucjis2004": "EUC_JIS_2004",
    **{f"latin{n}": f"LATIN{n}" for n in range(1, 11)},
    "iso88591": "LATIN1", "iso88592": "LATIN2", "iso88593": "LATIN3", "iso88594": "LATIN4",
    "iso88599": "LATIN5", "iso885910": "LATIN6", "iso885913": "LATIN7",
    "iso885914": "LATIN8", "iso885915": "LATIN9", "iso885916": "LATIN10",
    "iso88595": "ISO_8859_5", "iso88596": "ISO_8859_6", "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8",
    "koi8": "KOI8R", "koi8r": "KOI8R", "koi8u": "KOI8U",
    **{f"win{n}": f"WIN{n}" for n in (*range(1250, 1259), 866, 874)},
    **{f"windows{n}": f"WIN{n}" for n in (*range(1250, 1259), 866, 874)},
    "alt": "WIN866", "win": "WIN1251", "abc": "WIN1258", "tcvn": "WIN1258",
    "tcvn5712": "WIN1258", "vscii": "WIN1258",
}


def canonical(name: str) -> str | None:
    """Returns: the name Postgres reports for client encoding ``name``, or None when
    pgtenant cannot serve it (unknown to Postgres, client-only, or MULE_INTERNAL)."""
    return _CANONICAL.get(encoding_key(name))
