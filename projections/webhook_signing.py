"""Webhook signing secrets: how they are made, sealed at rest, and used to sign deliveries.

Signatures follow the Standard Webhooks scheme, as OpenAI signs its own webhooks: a secret
``whsec_<base64 of 24..64 random bytes>``; each delivery carries ``webhook-id`` (stable across
retries), ``webhook-timestamp`` (unix seconds of the attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">``, so a receiver
verifies with any Standard Webhooks library or ``openai.OpenAI().webhooks.unwrap``.

The secret itself never travels or rests in clear: it is sealed with AES-256-GCM under a key
from configuration (``[webhooks] secret_keys``), the webhook id as associated data (a sealed
secret copied onto another endpoint does not open). Records name the key by a short id, so
keys can be rotated: the first configured key seals, every configured key opens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.events import EncryptedSecret

SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32
_NONCE_BYTES = 12


class SecretError(ValueError):
    """A secret or key that cannot be used."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(_SECRET_BYTES)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; raises :class:`SecretError` for a malformed one."""
    if not secret.startswith(SECRET_PREFIX):
        raise SecretError(f"a signing secret starts with '{SECRET_PREFIX}'")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("a signing secret is 'whsec_' followed by base64") from None
    if not 24 <= len(raw) <= 64:
        raise SecretError("a signing secret holds 24 to 64 bytes")
    return raw


def secret_hint(secret: str) -> str:
    """What may be shown of a secret after its creation: its prefix and last characters."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
        "content-type": "application/json",
    }


def key_id(key: bytes) -> str:
    """A short public name of a sealing key (not a secret: a hash prefix)."""
    return hashlib.sha256(key).hexdigest()[:12]


class SecretBox:
    """Seals and opens signing secrets with the configured AES-256-GCM keys."""

    def __init__(self, keys: list[str]) -> None:
        self._keys: dict[str, AESGCM] = {}
        self._sealing: str | None = None
        for text in keys:
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise SecretError("webhooks.secret_keys entries are base64") from None
            if len(raw) != 32:
                raise SecretError("webhooks.secret_keys entries are 32 bytes (AES-256)")
            kid = key_id(raw)
            self._keys[kid] = AESGCM(raw)
            self._sealing = self._sealing or kid

    @property
    def enabled(self) -> bool:
        return self._sealing is not None

    @property
    def key_ids(self) -> list[str]:
        """The keys this process opens secrets with."""
        return list(self._keys)

    def seal(self, webhook_id: str, secret: str) -> EncryptedSecret:
        if self._sealing is None:
            raise SecretError("no webhooks.secret_keys configured")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self._sealing].encrypt(nonce, secret.encode(), webhook_id.encode())
        return EncryptedSecret(self._sealing, base64.b64encode(nonce + sealed).decode())

    def open(self, webhook_id: str, sealed: EncryptedSecret) -> str:
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            raise SecretError(f"the key '{sealed.key_id}' sealing this secret is not configured")
        raw = base64.b64decode(sealed.sealed)
        try:
            plain = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], webhook_id.encode())
        except InvalidTag:
            raise SecretError("the sealed secret does not open (wrong endpoint or key)") from None
        return plain.decode()


def new_key() -> str:
    """A fresh sealing key for ``webhooks.secret_keys``."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()
