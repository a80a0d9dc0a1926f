"""The one socket factory: every lmx socket is made here (linger 0, bounded messages)."""
import zmq

HARD_MAX_MSG_BYTES = 64 << 20   # zmq drops peers past this; the protocol's soft limit answers first


def make_socket(ctx, kind, endpoint, bind=False, identity=None, linger=0, curve=None,
                setup=None):
    """Create a socket of `kind`, bind or connect it to `endpoint`, and return it.

    curve: (public, secret, server_public) keys for a CURVE client; setup: a callable run on
    the socket before bind/connect (the broker's CURVE server settings).
    """
    sock = ctx.socket(kind)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    if setup is not None:
        setup(sock)
    sock.setsockopt(zmq.LINGER, linger)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MSG_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock
