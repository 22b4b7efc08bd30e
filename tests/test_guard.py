"""The relay address guard (SSRF): which addresses, spellings and ports a caller-chosen
relay may use, at intake and at connect time; and connection errors that never tell a
closed port from a silent one."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Sequence

import pytest
import redis

from postroom.api.app import create_app
from postroom.shared.errors import ConfigError, InvalidRelay, SendError
from postroom.shared.guard import CachedResolver, RelayGuard, parse_literal
from postroom.shared.relays import Relay
from postroom.worker.outcomes import CONNECT_FAILED
from postroom.worker.smtp import deliver
from tests.e2e import Stack
from tests.helpers import ADMIN, auth, make_settings, queue_length
from tests.smtp_server import ScriptedSmtpServer, SilentServer

PORTS = (25, 465, 587, 2525)

# names a stub DNS answers for
DNS: dict[str, list[str]] = {
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["10.1.2.3"],
    "metadata.example": ["169.254.169.254"],
    "mapped.example": ["::ffff:10.0.0.1"],
    "rebind.example": ["93.184.216.34", "127.0.0.1"],
    "cgnat.example": ["100.100.100.100"],
    "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
    "nat64.example": ["64:ff9b::808:808"],
}


class StubResolver:
    """Answers from ``DNS`` (names in any case, with or without the root's dot); unknown
    names do not resolve. Records every lookup."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = DNS if answers is None else answers
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        name = host.lower().rstrip(".")
        if name not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[name]


def guard(allow_hosts: Sequence[str] = (), ports: Sequence[int] = PORTS,
          resolver: StubResolver | None = None) -> RelayGuard:
    return RelayGuard(allow_hosts, ports, resolver=resolver or StubResolver())


REFUSED = [
    # loopback, in every spelling a resolver reads as one
    "127.0.0.1", "127.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.255.255.254",
    "::1", "[::1]", "::ffff:127.0.0.1", "::ffff:7f00:1", "[::ffff:127.0.0.1]", "::127.0.0.1",
    # unspecified, private, link-local (cloud metadata), CGNAT
    "0.0.0.0", "0", "::", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "100.127.255.254", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1",
    "fec0::1",
    # multicast, broadcast, reserved, documentation, benchmarking
    "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "ff02::1", "2001:db8::1",
    # IPv4 inside IPv6: NAT64 of internal addresses, local-use NAT64, 6to4, Teredo
    "64:ff9b::127.0.0.1", "64:ff9b::a00:1", "64:ff9b:1::808:808", "2002:7f00:1::1",
    "2002:808:808::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    # names that resolve inside (one bad address among good ones is enough)
    "localhost", "LOCALHOST.", "internal.example", "metadata.example", "mapped.example",
    "rebind.example", "cgnat.example",
]


@pytest.mark.parametrize("host", REFUSED)
def test_internal_addresses_are_refused(host: str) -> None:
    """Every internal address, and every name resolving to one, is InvalidRelay at
    intake and at connect time, on an allowed port."""
    with pytest.raises(InvalidRelay):
        guard().precheck(host, 587)
    with pytest.raises(InvalidRelay):
        guard().check(host, 587)


@pytest.mark.parametrize(
    ("host", "connect_to"),
    [
        ("93.184.216.34", "93.184.216.34"),
        ("2606:4700::1111", "2606:4700::1111"),
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("[2606:4700::1111]", "2606:4700::1111"),
        ("134744072", "8.8.8.8"),
        ("public.example", "93.184.216.34"),
        ("nat64.example", "64:ff9b::808:808"),
    ],
)
def test_public_relays_pass_and_the_checked_address_is_returned(
    host: str, connect_to: str
) -> None:
    """A public relay passes; ``check`` returns the address the worker connects to."""
    assert connect_to == guard().check(host, 587)
    assert False is guard().precheck(host, 587)


def test_an_address_needs_no_lookup() -> None:
    """Any spelling of an address is read without DNS, so a stub or a rebinding server
    is never asked about it."""
    resolver = StubResolver()
    for host in ("127.1", "0x7f.1", "2130706433", "[::1]", "8.8.8.8"):
        try:
            guard(resolver=resolver).check(host, 587)
        except InvalidRelay:
            pass
    assert [] == resolver.calls


def test_one_lookup_and_the_checked_address_is_the_one_used() -> None:
    """A rebinding DNS (public first, loopback next) is asked once: the answer that was
    checked is the address returned to connect to."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    g = RelayGuard((), PORTS, resolver=rebinding)
    assert ("93.184.216.34", ["relay.example"]) == (g.check("relay.example", 587), calls)


@pytest.mark.parametrize(
    "spelling",
    ["127.1", "2130706433", "0x7f.1", "0x7F.0.0.1", "0177.0.0.1", "127.0.1", "0", "1.2.3.4",
     "255.255.255.255", "0xffffffff", "017777777777", "10.0x10.1"],
)
def test_odd_spellings_are_read_as_the_c_library_reads_them(spelling: str) -> None:
    """``parse_literal`` agrees with the platform's ``inet_aton`` (what ``getaddrinfo``
    uses for numeric hosts)."""
    assert socket.inet_ntoa(socket.inet_aton(spelling)) == str(parse_literal(spelling))


@pytest.mark.parametrize("spelling", ["1.2.3.256", "256.1", "08", "0x", "1..2", "a.b", "1.2.3.4.5"])
def test_non_addresses_are_names(spelling: str) -> None:
    """What is not an address (by inet_aton's rules) is left to the resolver."""
    assert parse_literal(spelling) is None


def test_ports_are_limited() -> None:
    """Only 25, 465, 587 and 2525 by default (not Redis's 6379 or HTTP's 80), else what
    ``POSTROOM_SMTP_ALLOW_PORTS`` says."""
    for port in PORTS:
        assert "93.184.216.34" == guard().check("93.184.216.34", port)
    for port in (6379, 80, 22, 1025):
        with pytest.raises(InvalidRelay, match=f"relay port {port} is not allowed"):
            guard().check("93.184.216.34", port)
    assert "93.184.216.34" == guard(ports=[8025]).check("93.184.216.34", 8025)
    with pytest.raises(InvalidRelay):
        guard(ports=[8025]).check("93.184.216.34", 587)


def test_allow_hosts_exempt_from_address_and_port_rules() -> None:
    """A host named in POSTROOM_SMTP_ALLOW_HOSTS (any case, trailing dot), an address
    and a CIDR there exempt a relay from both the address rules and the port list."""
    g = guard(["Localhost", "127.0.0.1", "10.0.0.0/8", "[::1]"])
    assert "127.0.0.1" == g.check("localhost.", 6379)
    assert "127.0.0.1" == g.check("0x7f.1", 6379)
    assert "10.1.2.3" == g.check("internal.example", 1025)
    assert "::1" == g.check("[::1]", 25)
    assert True is g.precheck("::ffff:127.0.0.1", 6379)
    with pytest.raises(InvalidRelay):  # 169.254/16 is not listed
        g.check("metadata.example", 587)
    with pytest.raises(InvalidRelay):  # only one of its two addresses is listed
        guard(["127.0.0.0/8"]).check("rebind.example", 6379)


def test_an_invalid_cidr_is_a_start_up_error() -> None:
    """A typo in POSTROOM_SMTP_ALLOW_HOSTS fails loudly rather than allowing nothing."""
    with pytest.raises(ConfigError, match="POSTROOM_SMTP_ALLOW_HOSTS"):
        RelayGuard(["10.0.0.0/33"], PORTS)


def test_a_name_that_does_not_resolve() -> None:
    """At intake it passes (the worker decides); at connect time it is InvalidRelay; a
    bad port is refused at intake all the same."""
    assert False is guard().precheck("nowhere.example", 587)
    with pytest.raises(InvalidRelay, match="could not be resolved"):
        guard().check("nowhere.example", 587)
    with pytest.raises(InvalidRelay, match="port"):
        guard().precheck("nowhere.example", 6379)


def test_plain_text_only_toward_allowed_relays() -> None:
    """Scheme ``""`` is refused toward a public relay and allowed toward a listed one."""
    with pytest.raises(InvalidRelay, match="plain text"):
        guard().check("93.184.216.34", 25, "")
    assert "127.0.0.1" == guard(["127.0.0.1"]).check("127.0.0.1", 25, "")
    assert "93.184.216.34" == guard().check("93.184.216.34", 587, "smtp")


def test_messages_never_name_the_resolved_address() -> None:
    """The refusal names the host the caller gave, never what it resolved to."""
    with pytest.raises(InvalidRelay) as caught:
        guard().check("internal.example", 587)
    assert "10.1.2.3" not in str(caught.value.body())
    assert "internal.example" in caught.value.message


# -- no port scanner ---------------------------------------------------------------------


class JunkServer:
    """Accepts connections, writes a line that is not SMTP, and hangs up."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"-ERR wrong protocol\r\n")

    def __enter__(self) -> JunkServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def _connect_error(port: int) -> SendError:
    with pytest.raises(SendError) as caught:
        deliver(Relay("127.0.0.1", port, ""), connect_host="127.0.0.1", sender="a@example.com",
                recipients=["b@example.com"], data=b"x", timeout=0.5,
                ssl_context=ssl.create_default_context(), local_hostname="postroom.test")
    return caught.value


def test_closed_silent_and_non_smtp_ports_read_the_same(
    closed_port: int, silent_server: SilentServer
) -> None:
    """Whether nothing listens, something listens and says nothing, or something that is
    not SMTP answers: the caller reads one error, the same type and text."""
    with JunkServer() as junk:
        bodies = [_connect_error(p).body() for p in (closed_port, silent_server.port, junk.port)]
    expected = {"type": "SmtpUnavailable", "error": CONNECT_FAILED, "status": 504}
    assert [expected] * 3 == bodies


# -- through the API and a real worker ------------------------------------------------


@pytest.fixture
def stack(real_redis: redis.Redis, loopback_stack: Callable[..., Stack]) -> Stack:
    # the intake API allows loopback by address and by name; the worker only by name
    s = loopback_stack(default_smtp_url="", smtp_allow_hosts=("127.0.0.1", "localhost"))
    s.solution("acme")
    return s


INTERNAL = [
    ("127.0.0.1", 6379),  # Redis
    ("127.1", 6379),
    ("2130706433", 6379),
    ("0x7f.1", 1025),  # the dev sink
    ("localhost", 1025),
    ("::ffff:127.0.0.1", 25),
    ("::1", 587),
    ("169.254.169.254", 25),
]


@pytest.mark.parametrize(("server", "port"), INTERNAL)
def test_intake_refuses_internal_relays(
    real_redis: redis.Redis, redis_url: str, server: str, port: int
) -> None:
    """Redis, the dev sink, and other inside addresses (any spelling) are a 400
    InvalidRelay at intake, through the request's connection and through the solution's
    configuration, and nothing is enqueued."""
    client = create_app(make_settings(redis_url)).test_client()
    token = client.post("/api/v1/solutions", json={"solution_id": "acme"},
                        headers=auth(ADMIN)).get_json()["token"]
    before = queue_length(real_redis)
    r = client.post("/api/v1/solutions/acme/email", headers=auth(token), json={
        "to": ["a@example.com"], "connection": {"server": server, "port": port}})
    assert (400, "InvalidRelay") == (r.status_code, r.get_json()["type"])
    r = client.put("/api/v1/solutions/acme/config", headers=auth(token),
                   json={"connection_server": server, "connection_port": port})
    assert (400, "InvalidRelay") == (r.status_code, r.get_json()["type"])
    assert before == queue_length(real_redis)


def test_a_stored_relay_is_checked_at_every_send(
    real_redis: redis.Redis, redis_url: str
) -> None:
    """A solution relay stored while the allow list named it is refused at intake once
    the list no longer does (400 InvalidRelay), and nothing is enqueued."""
    wide = create_app(make_settings(redis_url, smtp_allow_hosts=("127.0.0.1",))).test_client()
    token = wide.post("/api/v1/solutions", headers=auth(ADMIN), json={
        "solution_id": "acme", "connection_server": "127.0.0.1", "connection_port": 6379,
        "connection_scheme": ""}).get_json()["token"]
    narrow = create_app(make_settings(redis_url)).test_client()
    r = narrow.post("/api/v1/solutions/acme/email", headers=auth(token),
                    json={"to": ["a@example.com"]})
    assert (400, "InvalidRelay") == (r.status_code, r.get_json()["type"])
    assert 0 == queue_length(real_redis)


@pytest.mark.slow
def test_the_worker_checks_again_at_connect_time(
    stack: Stack, smtp_server: ScriptedSmtpServer
) -> None:
    """A relay the intake allowed but the worker's allow list does not (here: 127.0.0.1 by
    address) fails ``InvalidRelay`` without a connection; the same server by an allowed
    name gets the message."""
    stack.start_worker(smtp_allow_hosts=("localhost",))
    refused = stack.send({"to": ["a@example.com"], "text": "x", "connection": {
        "server": "127.0.0.1", "port": smtp_server.port, "scheme": ""}})
    allowed = stack.send({"to": ["b@example.com"], "text": "x", "connection": {
        "server": "localhost", "port": smtp_server.port, "scheme": ""}})
    assert (202, 202) == (refused.status_code, allowed.status_code)
    doc = stack.wait_final(refused.get_json()["task_id"])
    assert ("failed", "InvalidRelay", 400) == (doc["state"], doc["error"]["type"],
                                               doc["error"]["status"])
    assert "sent" == stack.wait_final(allowed.get_json()["task_id"])["state"]
    assert [["b@example.com"]] == [m.rcpt_tos for m in smtp_server.messages]
    assert 1 == smtp_server.connections


# -- the per-process DNS cache ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_name_is_looked_up_once_per_ttl() -> None:
    """Within the TTL a name (in any case, with or without the root's dot) is answered from
    the cache; after it, looked up again."""
    stub, clock = StubResolver(), Clock()
    cached = CachedResolver(stub, ttl_s=30, clock=clock)
    g = RelayGuard((), PORTS, resolver=cached)
    assert "93.184.216.34" == g.check("public.example", 587)
    assert "93.184.216.34" == g.check("Public.Example.", 587)
    clock.now += 29.9
    assert not g.precheck("public.example", 587)
    assert ["public.example"] == stub.calls
    clock.now += 0.2
    g.check("public.example", 587)
    assert ["public.example", "public.example"] == stub.calls


def test_a_cached_answer_is_judged_every_time() -> None:
    """The cache keeps answers, not verdicts: an internal address is refused on every use,
    and an exemption added to a new guard applies to the same cached answer."""
    stub = StubResolver()
    cached = CachedResolver(stub, clock=Clock())
    for _ in range(2):
        with pytest.raises(InvalidRelay):
            RelayGuard((), PORTS, resolver=cached).check("internal.example", 587)
    assert RelayGuard(("10.0.0.0/8",), PORTS, resolver=cached).precheck("internal.example", 587)
    assert ["internal.example"] == stub.calls


def test_a_failed_lookup_is_not_kept() -> None:
    """A name that does not resolve yet is asked again next time (and then found)."""
    answers: dict[str, list[str]] = {}
    stub = StubResolver(answers)
    g = RelayGuard((), PORTS, resolver=CachedResolver(stub, clock=Clock()))
    with pytest.raises(InvalidRelay):
        g.check("new.example", 587)
    answers["new.example"] = ["93.184.216.34"]
    assert "93.184.216.34" == g.check("new.example", 587)
    assert ["new.example", "new.example"] == stub.calls


def test_the_cache_keeps_at_most_its_size_oldest_out_first() -> None:
    answers = {f"r{n}.example": ["93.184.216.34"] for n in range(4)}
    stub = StubResolver(answers)
    cached = CachedResolver(stub, max_names=3, clock=Clock())
    for n in range(4):
        cached(f"r{n}.example", 587)
    cached("r3.example", 587)  # kept
    cached("r1.example", 587)  # kept
    cached("r0.example", 587)  # dropped when r3 came: looked up again
    assert ["r0.example", "r1.example", "r2.example", "r3.example", "r0.example"] == stub.calls


def test_the_api_and_the_worker_keep_their_lookups(redis_url: str) -> None:
    """Both processes' guards look names up through a CachedResolver."""
    from postroom.api.services import Services
    from postroom.worker.resources import WorkerContext

    settings = make_settings(redis_url)
    for guard_ in (Services.build(settings).guard, WorkerContext.build(settings).guard):
        assert isinstance(guard_._resolve, CachedResolver)
