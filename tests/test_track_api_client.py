"""Customer.io's own Track client (the ``customerio`` package, ``CustomerIO``),
unchanged but for its ``host`` and ``port``, against a live ``gateway serve``
that speaks HTTPS (``server.tls``) with a self-signed certificate this test
makes with the ``cryptography`` package.

The client only builds ``https://`` URLs and verifies certificates through
``requests``; it has no CA option of its own, so the test hands ``requests``
the certificate the documented way, ``REQUESTS_CA_BUNDLE``
(docs/track-api-coming-in.md, "Pointing existing Track API code at the
gateway").  Every method of the client is called once; what a ``file``
destination writes must be the mapped Pipelines call(s) of each, in order.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from pytest_asyncio import fixture as async_fixture
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from customerio import CustomerIO, CustomerIOException, Regions
from test_track_api_mapping import as_written, matches

SITE_ID, API_KEY = "site-1", "key-1"
WRITE_KEY = "tls-write-key"
J = lambda ids, **extra: {"journeys": {"identifiers": ids}, **extra}  # noqa: E731


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost that is its own CA; → (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def written(path: Path, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The first ``n`` calls the file destination wrote, waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            assert len(lines) == n, f"the file destination wrote {len(lines)} calls, expected {n}"
            return [json.loads(ln) for ln in lines]
        time.sleep(0.05)


@async_fixture
async def tls_gateway(gateway_process: Callable[..., Any], tmp_path: Path) -> tuple[Any, Path, Path]:
    """(gateway process, CA bundle, the file destination's path)."""
    cert, key = self_signed(tmp_path)
    events = tmp_path / "events.jsonl"
    gw = await gateway_process(f"""
        server:
          tls: {{cert: "{cert}", key: "{key}"}}
        destinations:
          - name: Archive
            type: file
            settings: {{path: "{events}"}}
            batch: {{max_wait: 0.01}}
        sources:
          - name: classic
            kind: track_api
            track_api: {{site_id: {SITE_ID}, api_key: {API_KEY}}}
          - name: web
            write_keys: [{WRITE_KEY}]
        """)
    return gw, cert, events


REL = {"action": "add_relationships", "relationships": [{"identifiers": {"object_type_id": "1", "object_id": "acme"}}]}
#: (what the client is asked to do, the Pipelines calls that must come out)
METHODS: list[tuple[str, Callable[[CustomerIO], Any], list[dict[str, Any]]]] = [
    ("identify", lambda c: c.identify("5", email="ada@example.com", plan="pro", created_at=1361205308,
                                      cio_relationships=REL),
     [{"type": "identify", "userId": "5", "traits": {"plan": "pro", "created_at": 1361205308},
       "context": J({"id": "5", "email": "ada@example.com"})},
      {"type": "group", "userId": "5", "groupId": "acme", "traits": {}, "context": J({"id": "5"})}]),
    ("track", lambda c: c.track("5", "Order Completed", {"total": 42}, id="01HSE84CJTJKSF4BG1Y9JCQ5JJ",
                                timestamp=1710949020),
     [{"type": "track", "userId": "5", "event": "Order Completed", "properties": {"total": 42},
       "messageId": "01HSE84CJTJKSF4BG1Y9JCQ5JJ", "timestamp": "2024-03-20T15:37:00.000Z",
       "context": J({"id": "5"})}]),
    ("track_anonymous", lambda c: c.track_anonymous("anon-1", "Viewed Pricing", {"plan": "pro"}),
     [{"type": "track", "anonymousId": "anon-1", "event": "Viewed Pricing", "properties": {"plan": "pro"},
       "context": J({"anonymous_id": "anon-1"})}]),
    ("pageview", lambda c: c.pageview("5", "https://example.com/pricing", referrer="https://www.google.com/"),
     [{"type": "page", "userId": "5", "name": "https://example.com/pricing",
       "properties": {"referrer": "https://www.google.com/"}, "context": J({"id": "5"})}]),
    ("backfill", lambda c: c.backfill("5", "Signed Up", dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
                                      channel="ads"),
     [{"type": "track", "userId": "5", "event": "Signed Up", "properties": {"channel": "ads"},
       "timestamp": "2020-01-02T03:04:05.000Z", "context": J({"id": "5"})}]),
    ("add_device", lambda c: c.add_device("5", "tok/1", "ios", last_used=1710949380,
                                          attributes={"app_version": "1.2"}),
     [{"type": "track", "userId": "5", "event": "Device Created or Updated", "properties": {"app_version": "1.2"},
       "timestamp": "2024-03-20T15:43:00.000Z", "context": J({"id": "5"}, device={"token": "tok/1", "type": "ios"})}]),
    ("delete_device", lambda c: c.delete_device("5", "tok/1"),
     [{"type": "track", "userId": "5", "event": "Device Deleted", "properties": {},
       "context": J({"id": "5"}, device={"token": "tok/1"})}]),
    ("suppress", lambda c: c.suppress("5"),
     [{"type": "track", "userId": "5", "event": "User Suppressed", "properties": {}, "context": J({"id": "5"})}]),
    ("unsuppress", lambda c: c.unsuppress("5"),
     [{"type": "track", "userId": "5", "event": "User Unsuppressed", "properties": {}, "context": J({"id": "5"})}]),
    ("merge_customers", lambda c: c.merge_customers("id", "5", "email", "old@example.com"),
     [{"type": "alias", "userId": "5", "previousId": "old@example.com", "context": J({"id": "5"})}]),
    ("delete", lambda c: c.delete("old+x@example.com"),
     [{"type": "track", "userId": "old+x@example.com", "event": "User Deleted", "properties": {},
       "context": J({"email": "old+x@example.com"})}]),
    ("batch", lambda c: c.batch([
        {"type": "person", "action": "screen", "identifiers": {"id": "5"}, "name": "Settings", "timestamp": 1710949400},
        {"type": "object", "action": "identify", "identifiers": {"object_type_id": "2", "object_id": "acme"},
         "attributes": {"name": "Acme"}, "cio_relationships": [{"identifiers": {"id": "5"}}]}]),
     [{"type": "screen", "userId": "5", "name": "Settings", "properties": {}, "timestamp": "2024-03-20T15:43:20.000Z",
       "context": J({"id": "5"})},
      {"type": "group", "userId": "5", "groupId": "acme", "traits": {"name": "Acme", "object_type_id": "2"},
       "context": J({"object_type_id": "2", "object_id": "acme", "id": "5"})}]),
]


def test_every_client_method_is_covered() -> None:
    """The table above calls every public method of CustomerIO that sends."""
    sending = {name for name in vars(CustomerIO) if not name.startswith("_") and callable(getattr(CustomerIO, name))
               and name not in {"setup_base_url", "is_valid_id_type"} and not name.startswith("get_")}
    assert sending == {name for name, _, _ in METHODS}


def test_customerio_client_over_tls_reaches_a_destination_as_pipelines_calls(
        tls_gateway: tuple[Any, Path, Path], monkeypatch: pytest.MonkeyPatch, no_proxy: None) -> None:
    gw, ca, events = tls_gateway
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    # As the client is documented, but for host and port: region stays whatever it was.
    client = CustomerIO(SITE_ID, API_KEY, region=Regions.EU, host="127.0.0.1", port=gw.port)
    assert client.base_url == f"https://127.0.0.1:{gw.port}/api/v1"
    expected: list[dict[str, Any]] = []
    for name, call, calls in METHODS:
        resp = call(client)
        assert (resp.status_code, resp.json()) == (200, {}), name
        expected.extend(calls)
    client.close()
    got = written(events, len(expected))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert matches(as_written(g, e), e), i


def test_wrong_credentials_are_an_error_the_client_raises(
        tls_gateway: tuple[Any, Path, Path], monkeypatch: pytest.MonkeyPatch, no_proxy: None) -> None:
    gw, ca, events = tls_gateway
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    with CustomerIO(SITE_ID, "not-the-key", host="127.0.0.1", port=gw.port, retries=0) as client:
        with pytest.raises(CustomerIOException) as e:
            client.identify("5", plan="pro")
    assert str(e.value).startswith("401:") and '"code":"auth"' in str(e.value)
    with CustomerIO(SITE_ID, API_KEY, host="127.0.0.1", port=gw.port, retries=0) as client:
        with pytest.raises(CustomerIOException) as e:
            client.track("5", "x" * 101)
    assert str(e.value).startswith("400:") and '"field":"name"' in str(e.value)
    assert not events.exists() or events.read_text() == ""


def test_the_certificate_is_really_checked(
        tls_gateway: tuple[Any, Path, Path], monkeypatch: pytest.MonkeyPatch, no_proxy: None, tmp_path: Path) -> None:
    """Without the CA the client refuses the gateway (with it, as the session's
    ``verify``, it goes through); plain HTTP gets no answer."""
    gw, ca, _ = tls_gateway
    (tmp_path / "other").mkdir()
    other_ca, _ = self_signed(tmp_path / "other")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))
    with CustomerIO(SITE_ID, API_KEY, host="127.0.0.1", port=gw.port, retries=0) as client:
        with pytest.raises(CustomerIOException) as e:
            client.identify("5")
    assert "certificate" in str(e.value).lower() or "ssl" in str(e.value).lower()
    # The other documented way: the client's own requests session (kept while
    # pooling is on).  requests lets REQUESTS_CA_BUNDLE win over it, so unset.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with CustomerIO(SITE_ID, API_KEY, host="127.0.0.1", port=gw.port, retries=0) as client:
        client.http.verify = str(ca)
        assert client.identify("5").status_code == 200
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", gw.port), 5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", gw.port), 5) as plain:
        plain.sendall(b"PUT /api/v1/customers/5 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        plain.settimeout(5)
        try:
            reply = plain.recv(100)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    assert not reply.startswith(b"HTTP/1.1 200")


def test_pipelines_calls_over_tls_on_the_fast_path_then_through_aiohttp(
        tls_gateway: tuple[Any, Path, Path], no_proxy: None) -> None:
    """One TLS connection (docs/http-fast-path.md, "Connections"): a Pipelines
    call answered on the fast path, a request it hands to aiohttp, then a call
    aiohttp answers; both calls reach the destination."""
    gw, ca, events = tls_gateway
    auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()

    def track(event: str) -> bytes:
        body = json.dumps({"userId": "u1", "event": event}).encode()
        return (f"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", gw.port), 5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.settimeout(10)
        reader = tls.makefile("rb")
        for data, want in ((track("Fast"), b'{}'), (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b'{"status":"ok"}'),
                           (track("Through aiohttp"), b'{}')):
            tls.sendall(data)
            status = reader.readline()
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert (status, reader.read(length)) == (b"HTTP/1.1 200 OK\r\n", want)
    assert [c["event"] for c in written(events, 2)] == ["Fast", "Through aiohttp"]
