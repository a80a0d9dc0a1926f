"""The server's outbox over real sockets: a reply the ROUTER cannot take now is kept, in
order, never dropped; a backlog past the limit is reported."""
import zmq

from lmx.broker import server


def _pair(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 2)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 2)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"reader")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")                        # the ROUTER learns the peer
    assert router.poll(5000)
    router.recv_multipart()
    return router, dealer


def test_replies_past_the_high_water_mark_wait_in_order_and_none_is_lost():
    ctx = zmq.Context()
    router, dealer = _pair(ctx)
    try:
        box = server.Outbox(router)
        for i in range(500):
            box.send(b"reader", [str(i).encode()])
        assert box.pending[b"reader"], "the socket took everything: the test proves nothing"
        got = []
        for _ in range(100_000):             # the broker's loop: flush, then wait a little
            box.flush()
            while dealer.poll(5):
                got.append(int(dealer.recv()))
            if len(got) == 500:
                break
        assert got == list(range(500)) and not box.pending
    finally:
        dealer.close()
        router.close()
        ctx.term()


def test_a_backlog_past_the_limit_is_reported(monkeypatch):
    monkeypatch.setattr(server, "MAX_OUTBOX_BYTES", 1000)
    ctx = zmq.Context()
    router, dealer = _pair(ctx)
    try:
        box = server.Outbox(router)
        over = [box.send(b"reader", [b"x" * 100]) for _ in range(200)]
        assert not over[0] and over[-1]
    finally:
        dealer.close()
        router.close()
        ctx.term()


def test_a_reply_to_a_gone_client_is_dropped_not_kept():
    ctx = zmq.Context()
    router, dealer = _pair(ctx)
    try:
        box = server.Outbox(router)
        box.send(b"nobody", [b"x"])
        assert not box.pending
    finally:
        dealer.close()
        router.close()
        ctx.term()
