"""Who may call the Router, and how much one request may ask for: API keys and request limits.

    client ──Authorization: Bearer <key>──▶ Router
        1. API key (when configured): 401 unless it matches one of the keys; /health stays open
        2. body size: 413 past max_body_bytes (read_json_body in router.py)
        3. validation: 400 naming the field (api.py)
        4. prompt limit: 400 past max_prompt_tokens (after the chat template), then the context length
        5. output limit: 400 past max_tokens_cap, or past the room left in the context

Keys never travel in the app's arguments (Serve shows those in its dashboard and logs): the config
names where they live, a file (one key per line; blank lines and lines starting with '#' skipped)
or an environment variable of the Router's process (keys separated by commas), and each Router
replica reads them once when it starts. A presented key is compared with every configured key by
`hmac.compare_digest` over SHA-256 digests, so neither a key's content nor its length shows in the
time a check takes.

The HTTP surface accepts only the OpenAI request models of api.py (extra="forbid"): NIXL agent
metadata, block ids and transfer parameters are exchanged only between replicas of the app
(PrefillResponse over a Serve handle), and no route takes them from a client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

BEARER_PREFIX = "bearer "  # compared case-insensitively (RFC 9110 auth-scheme)
KEY_SEPARATOR_IN_ENV = ","
UNAUTHORIZED_MESSAGE = (
    "a valid API key is required: send it as 'Authorization: Bearer <key>' (the key was missing or not recognized)"
)


@dataclass(frozen=True)
class ApiKeySource:
    """Where a Router replica reads its API keys: exactly one of a file path and an environment variable name."""

    keys_file: str | None = None
    keys_env_var: str | None = None

    def __post_init__(self) -> None:
        if (self.keys_file is None) == (self.keys_env_var is None):
            raise ValueError("ApiKeySource needs exactly one of keys_file and keys_env_var")
        if self.keys_file is not None and not self.keys_file:
            raise ValueError("keys_file must be a non-empty path")
        if self.keys_env_var is not None and not self.keys_env_var:
            raise ValueError("keys_env_var must be a non-empty variable name")


def load_api_keys(source: ApiKeySource) -> list[str]:
    """The keys named by `source`; ValueError naming the file or variable when there are none."""
    if source.keys_file is not None:
        path = Path(source.keys_file)
        if not path.is_file():
            raise ValueError(f"keys_file: {source.keys_file!r} is not a readable file")
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        keys = [line for line in lines if line and not line.startswith("#")]
        where = f"keys_file {source.keys_file!r}"
    else:
        value = os.environ.get(source.keys_env_var)
        if value is None:
            raise ValueError(f"keys_env_var: the environment variable {source.keys_env_var!r} is not set")
        keys = [key.strip() for key in value.split(KEY_SEPARATOR_IN_ENV) if key.strip()]
        where = f"environment variable {source.keys_env_var!r}"
    if not keys:
        raise ValueError(f"{where} holds no API keys")
    bad = next((key for key in keys if any(c.isspace() for c in key)), None)
    if bad is not None:
        raise ValueError(f"{where}: an API key contains whitespace (keys are single tokens)")
    return keys


class ApiKeyVerifier:
    """Checks `Authorization: Bearer <key>` headers against a fixed set of keys in constant time."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("keys must hold at least one API key")
        self._digests = [hashlib.sha256(key.encode("utf-8")).digest() for key in keys]

    def is_authorized(self, authorization: str | None) -> bool:
        presented = bearer_token(authorization)
        if presented is None:
            return False
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        matched = False
        for known in self._digests:  # no early exit: every check costs the same
            matched |= hmac.compare_digest(digest, known)
        return matched


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None if it is not one."""
    if authorization is None or not authorization[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
        return None
    token = authorization[len(BEARER_PREFIX) :].strip()
    return token or None


def prompt_limit_problem(num_prompt_tokens: int, max_prompt_tokens: int | None, prompt_field: str) -> str | None:
    """Why a prompt of `num_prompt_tokens` is refused under `max_prompt_tokens`, or None if it is accepted."""
    if max_prompt_tokens is None or num_prompt_tokens <= max_prompt_tokens:
        return None
    return (
        f"{prompt_field}: the prompt has {num_prompt_tokens} tokens, more than this server's limit of "
        f"{max_prompt_tokens} prompt tokens"
    )
