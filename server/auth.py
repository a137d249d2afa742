"""API keys, roles and per-key policies.

``steer serve --auth FILE`` reads a YAML file of policies and keys; keys are stored as the sha256
hex of the key, never the key (``steer keys new`` prints a fresh one and its entry)::

    policies:
      public: {max_strength: 1.0, raw_vectors: false, features: {deny: [code]}}
    keys:
      - {name: ops,   role: admin, sha256: "<hex>"}
      - {name: alice, role: user,  policy: public, sha256: "<hex>"}

``--api-key KEY`` (env ``STEER_API_KEY``) adds one admin key named ``api-key``. With no key at
all every caller is an anonymous admin, but a POST, PATCH or DELETE must then be
``Content-Type: application/json`` (else 415): a web page's form or ``text/plain`` fetch cannot
change state (a JSON one needs a CORS preflight this server never grants).

Each request's :class:`Principal` is resolved once by a FastAPI dependency (:attr:`Auth.user`,
:attr:`Auth.admin`): 401 without a valid key, 403 ``permission_denied`` for the wrong role. The
request pipeline (:mod:`server.pipeline`) checks the key's policy (:mod:`server.policy`) on the
request's own steering; admission (:mod:`server.admission`) takes its ``max_slots`` and tokens
per minute (:mod:`server.ratelimit`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import AuthError, PermissionDenied, UnsupportedMediaType
from server.metrics import Metrics
from server.policy import Policy, PolicyViolation
from server.ratelimit import KeySlots, RateLimiter
from steering.spec import SteeringError, SteeringSpec
from steering.validation import first_error, param_path

if TYPE_CHECKING:
    from server.config import ServeConfig

logger = logging.getLogger(__name__)

Role = Literal["admin", "user"]
API_KEY_NAME = "api-key"
"""The name of the admin key that ``--api-key`` adds."""
KEY_PREFIX = "sk-steer-"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def hash_key(key: str) -> str:
    """The sha256 hex of ``key``: what an auth file stores."""
    return hashlib.sha256(key.encode()).hexdigest()


class Key(BaseModel):
    """One API key of the auth file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    """Who holds it (logs and errors; never a metrics label)."""
    role: Role = "user"
    """``user``: inference, catalog, inspect, feedback; ``admin``: also presets, experiments."""
    policy: str | None = None
    """The name of a policy of the same file; none: only the server's own limits."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 hex (lower case) of the key."""


class AuthFile(BaseModel):
    """The ``--auth`` YAML: named policies and the keys."""

    model_config = ConfigDict(extra="forbid")
    policies: dict[str, Policy] = Field(default_factory=dict)
    keys: list[Key] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> AuthFile:
        names: set[str] = set()
        hashes: set[str] = set()
        for i, key in enumerate(self.keys):
            where = f"keys[{i}] ({key.name})"
            if key.policy is not None and key.policy not in self.policies:
                raise ValueError(f"{where}: no policy named {key.policy!r} "
                                 f"(defined: {sorted(self.policies)})")
            if key.name in names:
                raise ValueError(f"{where}: a second key named {key.name!r}")
            if key.sha256 in hashes:
                raise ValueError(f"{where}: the same sha256 as an earlier key")
            names.add(key.name)
            hashes.add(key.sha256)
        return self


def load_auth(path: str | Path) -> AuthFile:
    """Read and validate an auth file; ValueError naming the file and the entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        auth = AuthFile.model_validate(raw)
    except OSError as exc:
        raise ValueError(f"auth file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"auth file {path}: not YAML: {exc}") from None
    except ValidationError as exc:
        err = first_error(exc)
        loc = param_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"auth file {path}: {loc + ': ' if loc else ''}{msg}") from None
    for name, policy in auth.policies.items():
        if policy.protect and policy.raw_vectors:
            logger.warning("auth policy %r protects %s but allows raw vectors, which can steer "
                           "any direction: set raw_vectors: false", name, sorted(policy.protect))
    return auth


class Principal(BaseModel):
    """Who sent a request: the key's name, its role and its policy (None: no extra limits)."""

    model_config = ConfigDict(frozen=True)
    name: str
    role: Role
    policy: Policy | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"


ANONYMOUS = Principal(name="anonymous", role="admin")
"""Every caller of a server without keys."""


class Auth:
    """The keys of one server and the per-key counters; :attr:`user` and :attr:`admin` are the
    router dependencies of the two roles."""

    def __init__(self, auth_file: AuthFile | None, api_key: str | None, metrics: Metrics) -> None:
        self.metrics = metrics
        self.policies = dict(auth_file.policies) if auth_file is not None else {}
        self.keys: list[tuple[bytes, Principal]] = []
        if auth_file is not None:
            for key in auth_file.keys:
                policy = auth_file.policies[key.policy] if key.policy else None
                self.keys.append((key.sha256.encode(),
                                  Principal(name=key.name, role=key.role, policy=policy)))
        if api_key:
            self.keys.append((hash_key(api_key).encode(), Principal(name=API_KEY_NAME, role="admin")))
        self.limiter = RateLimiter()
        self.slots = KeySlots()

        # async: run on the event loop (a sync dependency would run in a thread pool, racing
        # the token buckets), once per request however many routers name it.
        async def principal(request: Request) -> Principal:
            return self.authenticate(request)

        async def admin(who: Principal = Depends(principal)) -> Principal:
            if not who.admin:
                self.metrics.policy_denials.labels("role").inc()
                raise PermissionDenied(f"This route needs an admin key; the key {who.name!r} "
                                       "has the role 'user'.", None, "permission_denied")
            return who

        self.user = [Depends(principal)]
        """Router dependencies of the routes every key may call."""
        self.admin = [Depends(admin)]
        """Router dependencies of the routes only an admin key may call."""

    def check_monitors(self, compiler: Any) -> None:
        """Once the packs are loaded: every monitor a policy imposes must compile (an unknown or
        ambiguous feature stops the server at start, not each request of that key at run time)."""
        for name, policy in sorted(self.policies.items()):
            if policy.monitors and compiler is not None:
                try:
                    compiler.compile(SteeringSpec(monitors=list(policy.monitors)))
                except SteeringError as exc:
                    raise ValueError(f"auth policy {name!r}: its monitors do not compile on this "
                                     f"server: {exc.message}") from None

    @classmethod
    def from_config(cls, config: ServeConfig, metrics: Metrics) -> Auth:
        return cls(load_auth(config.auth) if config.auth else None, config.api_key, metrics)

    @property
    def open(self) -> bool:
        """No key configured: every caller is an anonymous admin."""
        return not self.keys

    def authenticate(self, request: Request) -> Principal:
        """The request's principal (also left in ``request.state.principal``); charges one
        request to its ``requests_per_minute``."""
        if self.open:
            if request.method in STATE_CHANGING:
                media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if media != "application/json":
                    raise UnsupportedMediaType(
                        "This server has no API key: a request that changes state must be "
                        "'Content-Type: application/json'.", None, "unsupported_media_type")
            request.state.principal = ANONYMOUS
            return ANONYMOUS
        who = self._lookup(request.headers.get("authorization", ""))
        request.state.principal = who
        rate = who.policy.rate if who.policy is not None else None
        if rate is not None and rate.requests_per_minute is not None:
            self.take(who, "requests", rate.requests_per_minute, 1)
        return who

    def _lookup(self, header: str) -> Principal:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self.metrics.auth_failures.labels("missing_api_key").inc()
            raise AuthError("Missing API key: send it as 'Authorization: Bearer <key>'", None,
                            "missing_api_key")
        digest = hash_key(token).encode()
        found: Principal | None = None
        for stored, who in self.keys:  # every key compared: the time says nothing about which
            if hmac.compare_digest(digest, stored):
                found = who
        if found is None:
            self.metrics.auth_failures.labels("invalid_api_key").inc()
            raise AuthError("Incorrect API key provided", None, "invalid_api_key")
        return found

    def take(self, who: Principal, kind: str, per_minute: int, amount: int) -> None:
        try:
            self.limiter.take(who.name, kind, per_minute, amount)
        except Exception:
            self.metrics.rate_limited.labels(kind).inc()
            raise

    def deny(self, exc: PolicyViolation) -> PolicyViolation:
        self.metrics.policy_denials.labels(exc.reason).inc()
        return exc


def principal_of(request: Request) -> Principal:
    """The principal the router dependency resolved (an anonymous admin where none ran)."""
    return getattr(request.state, "principal", ANONYMOUS)


def auth_of(request: Request) -> Auth | None:
    return getattr(request.app.state, "auth", None)


class AtResponseEnd:
    """Pure ASGI middleware: run the callbacks a request registered with :func:`at_end` once its
    response has ended (a stream's last chunk sent, an error, or the client gone)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        callbacks: list[Callable[[], None]] = []
        scope.setdefault("state", {})["at_end"] = callbacks
        try:
            await self.app(scope, receive, send)
        finally:
            for callback in callbacks:
                callback()


def at_end(request: Request, callback: Callable[[], None]) -> None:
    """Run ``callback`` when the response has ended (now, if no :class:`AtResponseEnd` runs)."""
    callbacks = getattr(request.state, "at_end", None)
    if callbacks is None:
        callback()
    else:
        callbacks.append(callback)


# -- steer keys new -------------------------------------------------------------------------

def new_key() -> str:
    """A fresh random key: ``sk-steer-`` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry(name: str, key: str, role: Role = "user", policy: str | None = None) -> str:
    """The YAML list item of ``key`` for an auth file's ``keys:``."""
    entry = Key(name=name, role=role, policy=policy, sha256=hash_key(key))
    fields = {"name": entry.name, "role": entry.role}
    if entry.policy:
        fields["policy"] = entry.policy
    fields["sha256"] = entry.sha256
    return "  - {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


def _keys_new(args: argparse.Namespace) -> int:
    try:
        key = new_key()
        entry = key_entry(args.name, key, args.role, args.policy)
    except ValidationError as exc:
        print(f"steer keys new: error: {first_error(exc)['msg']}", file=sys.stderr)
        return 2
    print(f"key (shown once; give it to {args.name}, it is not stored anywhere):\n  {key}\n")
    print("auth file entry (under 'keys:'):")
    print(entry)
    return 0


def add_keys_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keys", help="API keys for 'steer serve --auth'")
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    n = sub.add_parser("new", help="print a fresh key (once) and its auth-file entry")
    n.add_argument("name", help="who holds the key (a name in logs and errors)")
    n.add_argument("--role", choices=["admin", "user"], default="user",
                   help="user: inference, catalog, feedback; admin: also presets and experiments "
                        "(default: %(default)s)")
    n.add_argument("--policy", default=None, help="a policy name of the auth file")
    n.set_defaults(func=_keys_new)
