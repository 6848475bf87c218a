"""Opaque tokens: how they look, how they are generated and how they are stored (hashed).

A token is ``pgt_`` followed by 43 url-safe base64 characters (256 random bits). Only its
SHA-256 is stored: tokens carry full entropy, so a slow password hash would add nothing but
latency to every login. This module does no I/O.
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["TOKEN_PREFIX", "generate_token", "hash_token", "looks_like_token"]

TOKEN_PREFIX = "pgt_"


def generate_token() -> str:
    """Returns: a new random token; show it once, store only ``hash_token(token)``."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str | bytes) -> bytes:
    """Returns: the 32-byte SHA-256 digest under which a token is stored."""
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def looks_like_token(token: str) -> bool:
    """Returns: whether the text has the opaque-token shape (cheap pre-check, not auth)."""
    return token.startswith(TOKEN_PREFIX) and 20 <= len(token) <= 200
