"""The quotas file, shared by the broker and the gateway (pure: read once at start).

    [default]                       # requests that name no client; absent: unlimited
    max_agents = 8

    [[clients]]
    name = "coder"                  # shown in STATUS, the metrics and QUOTA replies
    key = "sk-lmx-coder-1"          # or key_env = "VAR" (read from the environment)
    models = ["smol"]               # the gateway's model names this key may use (["*"])
    max_agents = 4                  # live and parked agents registered with this key
    max_booked_bytes = "1GiB"       # the seats (KV) of its agents, live or parked
    max_n_ctx = 4096                # the largest n_ctx one REGISTER may ask for
    tokens_per_minute = 20000       # prompt + generated tokens over a sliding 60 s

Every limit is optional (absent: unlimited). Keys are kept only as their sha256 digest and
looked up by it (``digest``); ``secret`` reads a key entry's key or key_env, for this file and
for the gateway's [[keys]]. A bad file is refused with a ``QuotaFileError`` that names the
file and the field.
"""
import dataclasses
import hashlib
import os
import re
from typing import Optional

from lmx.common.config import parse_size
from lmx.common.files import read_toml

QUOTAS = ("max_agents", "max_booked_bytes", "max_n_ctx", "tokens_per_minute")
DEFAULT_CLIENT = "default"              # the client of requests that carry no key
WINDOW_S = 60.0                         # tokens_per_minute's sliding window
MIN_KEY_CHARS = 8
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class QuotaFileError(ValueError):
    """The quotas file is unusable; the message names the file and the field."""


def digest(token):
    """sha256 hex of a key (keys are looked up and compared by digest, never kept)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def secret(entry, what, error=ValueError):
    """The key of a config entry: its `key`, else the environment variable `key_env`;
    error(message) when neither gives one of MIN_KEY_CHARS characters or more."""
    token = entry.get("key")
    if token is None and "key_env" in entry:
        token = os.environ.get(str(entry["key_env"]))
        if not token:
            raise error(f"{what}: environment variable {entry['key_env']} is not set")
    if not isinstance(token, str) or len(token) < MIN_KEY_CHARS:
        raise error(f"{what} needs key ({MIN_KEY_CHARS} characters or more) or key_env")
    return token


@dataclasses.dataclass(frozen=True)
class Limits:
    """One client's limits; None is unlimited."""

    max_agents: Optional[int] = None
    max_booked_bytes: Optional[int] = None
    max_n_ctx: Optional[int] = None
    tokens_per_minute: Optional[int] = None

    def as_dict(self):
        return {name: getattr(self, name) for name in QUOTAS}


@dataclasses.dataclass(frozen=True)
class QuotaClient:
    """One [[clients]] entry: its name, its key's digest, the models it may use, its limits."""

    name: str
    digest: str
    models: frozenset
    limits: Limits

    def allows(self, alias):
        """Whether this client may use the (gateway) model alias."""
        return "*" in self.models or alias in self.models


@dataclasses.dataclass
class QuotaConfig:
    """The whole file: the default limits and the clients, by name and by key digest."""

    path: str = ""
    default: Limits = dataclasses.field(default_factory=Limits)
    clients: dict = dataclasses.field(default_factory=dict)     # name -> QuotaClient
    by_digest: dict = dataclasses.field(default_factory=dict)   # digest -> QuotaClient

    def client_for(self, token):
        """The QuotaClient of a key, or None."""
        return self.by_digest.get(digest(token)) if token else None

    def limits(self, name):
        """The limits of a client name (DEFAULT_CLIENT: the [default] table)."""
        client = self.clients.get(name)
        return client.limits if client is not None else self.default

    def names(self):
        """Every client name, the default first."""
        return [DEFAULT_CLIENT, *self.clients]


def load(path):
    """Read a quotas file; QuotaFileError naming the file and the field on anything wrong."""
    return from_dict(read_toml(path, QuotaFileError), str(path))


def from_dict(data, where="quotas"):
    """A QuotaConfig from parsed TOML."""
    unknown = sorted(set(data) - {"default", "clients"})
    if unknown:
        raise QuotaFileError(f"{where}: unknown tables {unknown} (known: default, clients)")
    default = data.get("default", {})
    if not isinstance(default, dict):
        raise QuotaFileError(f"{where}: default must be a table")
    out = QuotaConfig(str(where), _limits(default, f"{where}: default", set()))
    clients = data.get("clients", [])
    if not isinstance(clients, list):
        raise QuotaFileError(f"{where}: clients must be an array of tables ([[clients]])")
    for i, entry in enumerate(clients):
        client = _client(entry, f"{where}: clients[{i}]")
        if client.name in out.clients:
            raise QuotaFileError(f"{where}: clients[{i}].name {client.name!r} is used twice")
        if client.digest in out.by_digest:
            raise QuotaFileError(f"{where}: clients[{i}] has the same key as client "
                                 f"{out.by_digest[client.digest].name!r}")
        out.clients[client.name] = client
        out.by_digest[client.digest] = client
    return out


def _client(entry, what):
    if not isinstance(entry, dict):
        raise QuotaFileError(f"{what} must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == DEFAULT_CLIENT:
        raise QuotaFileError(f"{what}.name must be 1-64 letters, digits and _.- (not "
                             f"{DEFAULT_CLIENT!r}), got {name!r}")
    token = secret(entry, what, QuotaFileError)
    models = entry.get("models", ["*"])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise QuotaFileError(f"{what}.models must be a list of model names")
    limits = _limits(entry, what, {"name", "key", "key_env", "models"})
    return QuotaClient(name, digest(token), frozenset(models), limits)


def _limits(table, what, other_fields):
    unknown = sorted(set(table) - set(QUOTAS) - other_fields)
    if unknown:
        raise QuotaFileError(f"{what}: unknown fields {unknown} (known: "
                             f"{', '.join(sorted(other_fields | set(QUOTAS)))})")
    return Limits(**{name: _limit(table[name], f"{what}.{name}", name == "max_booked_bytes")
                     for name in QUOTAS if name in table})


def _limit(value, what, size):
    """A limit: an int >= 0; a size may also be a string such as "2GiB"."""
    if size and isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise QuotaFileError(f"{what}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        kind = "an integer >= 0" + (" or a size such as \"2GiB\"" if size else "")
        raise QuotaFileError(f"{what} must be {kind}, got {value!r}")
    return value
