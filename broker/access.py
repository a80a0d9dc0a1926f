"""Who may load what, and where the broker listens.

- REGISTER loads only operator-table keys or files under the configured model directories
  (`--model-dir`, repeatable). Paths are resolved (symlinks, `..`) before the check, so a link
  inside a model directory that points outside it is refused too. The check comes before any
  existence test, so the broker never says whether a file outside those directories exists.
- An ipc endpoint's socket file is made mode 0600, in a directory the broker creates 0700 when
  it does not exist yet.
- A tcp endpoint needs CURVE: the server's secret key and a directory of the public keys of the
  clients allowed in (zmq.auth); without them the broker refuses to start.
"""
import logging
import os
import stat

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lmx.common.errors import Code, LmxError, Reason

log = logging.getLogger("lmx.broker")


def check_model_path(path, model_dirs):
    """Raise FORBIDDEN unless the resolved path lies inside one of the resolved model dirs."""
    real = os.path.realpath(path)
    for folder in model_dirs:
        root = os.path.realpath(folder)
        if os.path.commonpath([real, root]) == root:
            return real
    raise LmxError(Code.FORBIDDEN, "model paths must lie under a configured model directory "
                   f"({len(model_dirs)} configured); use a table key or --model-dir",
                   Reason.OUTSIDE_MODEL_DIRS)


def ipc_path(endpoint):
    """The filesystem path of an ipc:// endpoint, or None."""
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def prepare_ipc(endpoint):
    """Create the endpoint's directory 0700 if missing; warn if it is writable by others."""
    path = ipc_path(endpoint)
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700)
    mode = os.stat(folder).st_mode
    if mode & (stat.S_IWOTH | stat.S_IWGRP) and not mode & stat.S_ISVTX:
        log.warning("access: %s is writable by others; prefer a private directory", folder)


def lock_down_ipc(endpoint):
    """After bind: the socket file is readable and writable by its owner only."""
    path = ipc_path(endpoint)
    if path is not None and os.path.exists(path):
        os.chmod(path, 0o600)


class _ZapLog(logging.LoggerAdapter):
    """The authenticator's log: it reports every handshake at debug; a refused key (an
    unknown worker or client) is worth a warning."""

    def debug(self, msg, *args, **kwargs):
        text = str(msg) % args if args else str(msg)
        level = logging.WARNING if text.startswith("DENIED") else logging.DEBUG
        self.log(level, "access: %s", text, **kwargs)


def secure_tcp(ctx, sock, endpoint, secret_file, keys_dir, auth=None, domain=None,
               what="a TCP endpoint", keys="--curve-clients"):
    """Make a tcp ROUTER a CURVE server that admits only the public keys in keys_dir.

    One authenticator serves the whole context: pass the one returned before (auth) to add a
    socket in its own ZAP domain (domain; None: every socket without one). Returns the
    authenticator (keep it; stop it on close), or auth unchanged for a non-tcp endpoint.
    Raises RuntimeError without keys.
    """
    if not endpoint.startswith("tcp://"):
        return auth
    if not secret_file or not keys_dir:
        raise RuntimeError(f"{endpoint} is {what}: it needs --curve-secret-key and "
                           f"{keys} (zmq.auth keys); see the README's threat model")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise RuntimeError(f"{secret_file} holds no secret key")
    if auth is None:
        auth = ThreadAuthenticator(ctx, log=_ZapLog(log, {}))
        auth.start()
    auth.configure_curve(domain=domain or "*", location=keys_dir)
    if domain:
        sock.zap_domain = domain.encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth
