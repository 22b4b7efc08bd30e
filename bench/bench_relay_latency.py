"""One kept SMTP connection to a relay some milliseconds away, with and without PIPELINING.

    .venv/bin/python bench/bench_relay_latency.py [--rtt-ms 5] [--messages 200]

A relay on loopback answers in well under a millisecond; a real one is often a few to tens
of milliseconds away, and then a pool process's rate is set by the round trips of each
transaction, not by CPU. This starts an aiosmtpd relay (offering PIPELINING or not) behind a
proxy that holds every reply back by ``--rtt-ms`` (a round trip's worth), and sends
``--messages`` messages one after another over one kept connection of postroom's
``SmtpPool``, as one pool process does. It prints messages per second and milliseconds per
message for both relays, and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.controller import Controller  # noqa: E402

from postroom.dev.embedded_redis import free_port  # noqa: E402
from postroom.shared.relays import Relay  # noqa: E402
from postroom.worker.message import build_message  # noqa: E402
from postroom.worker.pool import SmtpPool  # noqa: E402
from postroom.worker.smtp import make_ssl_context  # noqa: E402
from tests.delay_proxy import DelayProxy  # noqa: E402

HOST = "127.0.0.1"


class _Relay:
    """Accepts every message; offers PIPELINING when asked."""

    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.count = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 2.0.0 Ok: queued"


def measure(pipelining: bool, rtt_s: float, messages: int) -> float:
    """Seconds per message over one kept connection."""
    handler = _Relay(pipelining)
    relay_port = free_port()
    controller = Controller(handler, hostname=HOST, port=relay_port,
                            server_hostname="relay.localhost")  # fmt: skip
    controller.start()
    proxy = DelayProxy(relay_port, rtt_s).start()
    pool = SmtpPool()
    relay = Relay(host=HOST, port=proxy.port, scheme="")
    context = make_ssl_context(None)

    def send(n: int) -> None:
        data = build_message(sender="bench@postroom.localhost", to=[f"r{n}@example.com"],
                             cc=[], subject="latency", text="hello", html=None,
                             message_id=f"<{n}@bench>")  # fmt: skip
        pool.deliver(relay, connect_host=HOST, sender="bench@postroom.localhost",
                     recipients=[f"r{n}@example.com"], data=data, timeout=30,
                     ssl_context=context, local_hostname="bench.localhost")  # fmt: skip

    try:
        send(-1)  # the connection is opened (and kept) here
        started = time.perf_counter()
        for n in range(messages):
            send(n)
        took = time.perf_counter() - started
    finally:
        pool.close_all()
        proxy.stop()
        controller.stop()
    if handler.count != messages + 1:
        raise RuntimeError(f"the relay got {handler.count} of {messages + 1} messages")
    return took / messages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=5.0)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    rtt = args.rtt_ms / 1000
    print(f"bench_relay_latency: {args.messages} messages over one kept connection, each "
          f"reply held back {args.rtt_ms:g} ms")  # fmt: skip
    per = {}
    for pipelining in (False, True):
        per[pipelining] = measure(pipelining, rtt, args.messages)
        label = "relay offers PIPELINING" if pipelining else "relay without PIPELINING"
        print(f"  {label:26} {1 / per[pipelining]:7.1f} msg/s   "
              f"{per[pipelining] * 1000:6.2f} ms per message "
              f"({per[pipelining] / rtt:.1f} round trips)")  # fmt: skip
    print(f"  ratio (PIPELINING / without): {per[False] / per[True]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
