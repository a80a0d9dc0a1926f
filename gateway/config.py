"""The gateway's configuration: one TOML file, read once at start (pure: no sockets).

    [gateway]
    listen = "127.0.0.1:8000"     # --listen overrides
    idle_timeout_s = 600          # an agent idle this long is UNREGISTERed
    max_body_bytes = 1048576
    max_messages = 256

    [models.smol]                 # the OpenAI model name clients send
    model = "smol"                # what REGISTER gets: a broker table key or a GGUF path
    n_ctx = 4096                  # and any context parameter of REGISTER

    [[keys]]                      # Bearer keys; none: no auth (loopback only)
    key = "sk-local-1"            # or key_env = "VAR" to read it from the environment
    models = ["smol"]             # or ["*"]

    [cors]                        # absent: no CORS headers at all
    allow_origins = ["http://localhost:3000"]

lmx-gateway --quotas FILE (the broker's quotas file) adds each [[clients]] key as an API key
with its models, and forwards it to the broker so that client's quota applies.
"""
import dataclasses
import ipaddress

from lmx.common.files import read_toml
from lmx.common.quotas import digest, secret

REGISTER_PARAMS = ("n_ctx", "flash_attn", "type_k", "type_v", "swa_full")
DEFAULT_LISTEN = "127.0.0.1:8000"


class ConfigError(ValueError):
    """The configuration file is unusable; the message says where."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model clients may name: its alias, what REGISTER gets, its context parameters."""

    alias: str
    model: str
    context: dict                        # n_ctx, flash_attn, ... as REGISTER takes them


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """A Bearer key: a name for logs and session ids, and the model aliases it may use."""

    name: str
    digest: str                          # sha256 of the key: the key itself is not kept
    models: frozenset
    forward: bool = False                # a quotas client's key: sent on to the broker

    def allows(self, alias):
        """Whether this key may use the model alias."""
        return "*" in self.models or alias in self.models


@dataclasses.dataclass
class GatewayConfig:
    """Everything the gateway reads from its TOML file (defaults when there is none)."""

    listen: str = DEFAULT_LISTEN
    broker: str = None
    models: dict = dataclasses.field(default_factory=dict)     # alias -> ModelEntry
    keys: dict = dataclasses.field(default_factory=dict)       # digest -> ApiKey
    idle_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    request_timeout_s: float = 600.0     # no broker reply in this long: 504
    retry_after_s: int = 5               # Retry-After of a 503 (ledger denial, worker down)
    agent_prefix: str = "gw"
    cors_origins: tuple = ()

    def key_for(self, token):
        """The ApiKey of a Bearer token, or None."""
        return self.keys.get(digest(token)) if token else None


def load(path):
    """Read a TOML file into a GatewayConfig; ConfigError naming the bad entry."""
    if path is None:
        return GatewayConfig()
    return from_dict(read_toml(path, ConfigError), str(path))


def from_dict(data, where="config"):
    """A GatewayConfig from parsed TOML."""
    g = dict(data.get("gateway", {}))
    cfg = GatewayConfig()
    for name in ("listen", "broker", "agent_prefix"):
        if name in g:
            setattr(cfg, name, _typed(g.pop(name), str, f"{where}: gateway.{name}"))
    for name in ("idle_timeout_s", "request_timeout_s"):
        if name in g:
            setattr(cfg, name, float(_typed(g.pop(name), (int, float),
                                          f"{where}: gateway.{name}")))
    for name in ("max_body_bytes", "max_messages", "retry_after_s"):
        if name in g:
            setattr(cfg, name, _typed(g.pop(name), int, f"{where}: gateway.{name}"))
    if g:
        raise ConfigError(f"{where}: unknown gateway settings {sorted(g)}")
    if not (1 <= len(cfg.agent_prefix) <= 16 and cfg.agent_prefix.isalnum()):
        raise ConfigError(f"{where}: gateway.agent_prefix must be 1-16 letters or digits")
    cfg.models = {alias: _model(alias, entry, where)
                  for alias, entry in data.get("models", {}).items()}
    cfg.keys = {}
    for i, entry in enumerate(data.get("keys", [])):
        key = _key(i, entry, where)
        cfg.keys[key.digest] = key
    cors = data.get("cors", {})
    cfg.cors_origins = tuple(_typed(cors.get("allow_origins", []), list,
                                    f"{where}: cors.allow_origins"))
    return cfg


def _typed(value, types, what):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else
                                                (types,)):
        raise ConfigError(f"{what} has the wrong type")
    if not isinstance(value, types):
        raise ConfigError(f"{what} has the wrong type ({type(value).__name__})")
    return value


def _model(alias, entry, where):
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise ConfigError(f"{where}: models.{alias} needs model = \"table key or GGUF path\"")
    extra = set(entry) - {"model", *REGISTER_PARAMS}
    if extra:
        raise ConfigError(f"{where}: models.{alias} has unknown settings {sorted(extra)}")
    context = {k: entry[k] for k in REGISTER_PARAMS if k in entry}
    return ModelEntry(alias, entry["model"], context)


def _key(i, entry, where):
    token = secret(entry, f"{where}: keys[{i}]", ConfigError)
    models = entry.get("models", ["*"])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{where}: keys[{i}].models must be a list of model names")
    return ApiKey(str(entry.get("name", f"key{i}")), digest(token), frozenset(models))


def add_quota_clients(cfg, quotas, where="--quotas"):
    """Accept every client key of a quotas file (common/quotas.py) as an API key with its
    models; requests with one carry it to the broker, whose quota for that client applies."""
    for client in quotas.clients.values():
        if client.digest in cfg.keys:
            raise ConfigError(f"{where}: client {client.name!r} has the same key as "
                              f"[[keys]] {cfg.keys[client.digest].name!r}")
        cfg.keys[client.digest] = ApiKey(client.name, client.digest, client.models, True)
    return cfg


def parse_listen(listen):
    """'HOST:PORT' -> (host, port); ConfigError if malformed."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {listen!r} is not HOST:PORT")
    return host, int(port)


def is_loopback(host):
    """Whether host is a loopback address (or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg, host):
    """Refuse a non-loopback listen address without API keys."""
    if not is_loopback(host) and not cfg.keys:
        raise ConfigError(f"refusing to listen on {host} (not loopback) without API keys: "
                          "add [[keys]] to the config, or listen on 127.0.0.1")
