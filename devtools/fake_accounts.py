"""A stand-in for Spotify's accounts service: a real HTTP/1.1 server on 127.0.0.1 for end-to-end tests and benchmarks.

It answers POST /api/token like Spotify does, and misbehaves on request. For a browser it also plays
the login and the Web API (`make run` offers it when .env has no Spotify credentials):

    GET /authorize  a consent page (Agree / Cancel) for response_type=code, with PKCE (S256) or
                    without; Agree redirects to redirect_uri with code and state, Cancel with
                    error=access_denied. `decision=accept` or `decision=deny` in the query answers
                    at once. A code it issued works once, with the same redirect_uri, and with the
                    code_verifier of its code_challenge ("code_verifier was incorrect" otherwise).
    GET /v1/me      {"display_name": ...} for an access token it issued (Bearer), with CORS.
 A fault is chosen per
request by the authorization code or refresh token it receives (so concurrent tests do not
interfere), or for every request, app-only tokens (client credentials) included, by `fault`:

    fault-500       500 with an HTML body          fault-html      200 with an HTML body
    fault-429       429 with Retry-After: 7        fault-noaccess  200 JSON without access_token
    fault-reset     connection reset, no answer    fault-timeout   no answer for 60 seconds
    fault-slow      answer after 1 second          invalid-...     400 {"error": "invalid_grant"}
    fault-slow-N    answer after N seconds (e.g. fault-slow-3, fault-slow-0.5)
    fault-429-N     429 with Retry-After: N    fault-400       400 {"error": "invalid_request"}
    fault-trickle   a 200 sent one byte every 0.3 seconds: each wait is short, the whole is not
    rotate-...      (refresh) answer carries a new refresh token "rotated-..."
    rotating-...    (swap) hands out the refresh token "rotate-rotating-...", which the first refresh rotates

Refresh tokens end as Spotify's do when `refresh_token_lifetime` (seconds) is set: a refresh token this
stand-in handed out at a swap, and the one it rotated that into, is refused with 400 invalid_grant
("Refresh token expired") once that long has passed since the swap, by `clock` (time.time unless given).

Settings: `latency` (seconds before every answer), `connect_delay` (extra seconds before the first
answer on each new connection: a stand-in for TCP and TLS handshakes), `fault`, and TLS with a
certificate made at start. Control: GET /_stats, GET /_requests (what was received, decoded),
POST /_reset. Run it alone with `python devtools/fake_accounts.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import html
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret"

_REASONS = {200: "OK", 204: "No Content", 302: "Found", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost; returns (cert path, key path)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    return cert, key


class FakeAccounts:
    """The fake accounts service; start() runs it on its own thread and event loop."""

    def __init__(self, *, latency: float = 0.0, connect_delay: float = 0.0, fault: str | None = None,
                 tls: bool = False, host: str = "127.0.0.1", port: int = 0, record: bool = True,
                 display_name: str = "Stand-in Listener", redirect_uris: tuple[str, ...] | None = None,
                 refresh_token_lifetime: float | None = None, clock: Callable[[], float] = time.time):
        self.latency = latency
        self.refresh_token_lifetime = refresh_token_lifetime
        self._clock = clock
        # When each refresh token it handed out was signed in (its swap), as Spotify keeps it.
        self._signed_in: dict[str, float] = {}
        self.connect_delay = connect_delay
        self.fault = fault
        self.host = host
        self.port = port
        self.record = record
        self.requests: list[dict] = []
        # The browser side: what /authorize received (when recording), the codes it issued (None once
        # redeemed), the last access tokens /api/token handed out (for /v1/me). redirect_uris: the ones
        # "registered" for CLIENT_ID; None accepts any.
        self.display_name = display_name
        self.redirect_uris = redirect_uris
        self.authorizations: list[dict[str, str]] = []
        self._logins: dict[str, dict | None] = {}
        self._access_tokens: collections.deque[str] = collections.deque(maxlen=1000)
        self.connections = 0
        self.served = 0
        self.cert_file = None
        self._ssl = None
        if tls:
            self._tmp = tempfile.TemporaryDirectory()
            self.cert_file, key = make_certificate(self._tmp.name)
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(self.cert_file, key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._open: set[_Connection] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://{self.host}:{self.port}"

    def reset(self) -> None:
        self.requests.clear()
        self.authorizations.clear()
        self.connections = 0
        self.served = 0

    # -- running -------------------------------------------------------------------------------
    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = server = await self._loop.create_server(
            lambda: _Connection(self), self.host, self.port, ssl=self._ssl, backlog=4096,
        )
        self.port = server.sockets[0].getsockname()[1]

    def start(self) -> FakeAccounts:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-accounts", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake accounts service did not start")
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return

        async def shutdown() -> None:
            # Close what the server under test still holds open (keep-alive, a fault-timeout in
            # progress) so no transport is left to the garbage collector's ResourceWarning.
            server.close()
            for connection in list(self._open):
                connection.close()
            await asyncio.sleep(0)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> FakeAccounts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._ssl is not None:
            self._tmp.cleanup()  # the certificate made at start

    # -- answering -----------------------------------------------------------------------------
    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes, *, faults: bool = True):
        """(status, headers, body bytes) or a fault name for the connection to act on.

        faults=False answers as if no fault had been asked for, without counting or recording the
        request again: the second half of a fault-slow.
        """
        if path == "/_stats":
            return 200, {}, json.dumps({"connections": self.connections, "requests": self.served}).encode()
        if path == "/_requests":
            return 200, {}, json.dumps(self.requests).encode()
        if path == "/_reset" and method == "POST":
            self.reset()
            return 200, {}, b"{}"
        browser = self.browser_answer(method, path, headers)
        if browser is not None:
            return browser
        if path != "/api/token" or method != "POST":
            return 404, {}, json.dumps({"error": "not_found"}).encode()

        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if faults:
            self.served += 1
        if self.record and faults:
            self.requests.append({"headers": headers, "form": form, "content_type": headers.get("content-type", "")})

        refused = _refused_credentials(headers.get("authorization", ""))
        if refused:
            return 400, {}, json.dumps({"error": "invalid_client", "error_description": refused}).encode()

        grant = form.get("grant_type")
        if self.fault and faults:
            return self.fault
        if grant == "client_credentials":
            return 200, {}, json.dumps({"access_token": f"app-{self.served}", "token_type": "Bearer", "expires_in": 3600}).encode()
        subject = form.get("code") if grant == "authorization_code" else form.get("refresh_token")
        if grant not in ("authorization_code", "refresh_token") or not subject:
            return 400, {}, json.dumps({"error": "invalid_request"}).encode()
        fault = self.fault or (subject if subject.startswith("fault-") else None)
        if fault and faults:
            return fault
        if subject.startswith("invalid"):
            description = "Invalid authorization code" if grant == "authorization_code" else "Invalid refresh token"
            return 400, {}, json.dumps({"error": "invalid_grant", "error_description": description}).encode()
        if grant == "refresh_token" and self._expired(subject):
            return 400, {}, json.dumps({"error": "invalid_grant", "error_description": "Refresh token expired"}).encode()
        if grant == "authorization_code" and subject in self._logins:
            refused = self._redeem(form)
            if refused is not None:
                return refused

        access_token = f"access-{self.served}"
        tokens: dict[str, str | int] = {"access_token": access_token, "token_type": "Bearer", "expires_in": 3600,
                                        "scope": "user-read-private"}
        if grant == "authorization_code":
            issued = f"rotate-{subject}" if subject.startswith("rotating-") else f"AQ-refresh-for-{subject}"
            tokens["refresh_token"] = issued
            if self.refresh_token_lifetime is not None:  # kept only when it ends: floods swap millions
                self._signed_in[issued] = self._clock()
        elif subject.startswith("rotate-"):
            tokens["refresh_token"] = rotated = "rotated-" + subject[len("rotate-"):]
            if subject in self._signed_in:  # the same sign-in: rotating does not extend it
                self._signed_in[rotated] = self._signed_in[subject]
        self._access_tokens.append(access_token)
        return 200, {}, json.dumps(tokens).encode()

    def _expired(self, refresh_token: str) -> bool:
        signed_in = self._signed_in.get(refresh_token)
        return (self.refresh_token_lifetime is not None and signed_in is not None
                and self._clock() - signed_in >= self.refresh_token_lifetime)

    # -- the browser side: login and Web API -----------------------------------------------------
    def browser_answer(self, method: str, path: str, headers: dict[str, str]):
        """The answer to GET /authorize or /v1/me (and its preflight); None for any other request."""
        route, _, query = path.partition("?")
        if route == "/authorize" and method == "GET":
            return self._authorize(dict(parse_qsl(query, keep_blank_values=True)))
        if route == "/v1/me" and method == "OPTIONS":
            return 204, {**_CORS, "Access-Control-Allow-Headers": "Authorization",
                         "Access-Control-Allow-Methods": "GET", "Access-Control-Max-Age": "600"}, b""
        if route == "/v1/me" and method == "GET":
            return self._me(headers.get("authorization", ""))
        return None

    def _authorize(self, query: dict[str, str]):
        if self.record:
            self.authorizations.append(query)
        # Like Spotify: an unknown client or redirect URI gets an error page, never a redirect.
        if query.get("client_id") != CLIENT_ID:
            return 400, _PAGE, _page("<h1>INVALID_CLIENT: Invalid client</h1>")
        redirect_uri = query.get("redirect_uri", "")
        if not redirect_uri or (self.redirect_uris is not None and redirect_uri not in self.redirect_uris):
            return 400, _PAGE, _page("<h1>INVALID_CLIENT: Invalid redirect URI</h1>")

        def back(**fields: str):
            if "state" in query:
                fields["state"] = query["state"]
            separator = "&" if "?" in redirect_uri else "?"
            return 302, {**_HTML, "Location": redirect_uri + separator + urlencode(fields)}, b""

        if query.get("response_type") != "code":
            return back(error="unsupported_response_type")
        challenge, challenge_method = query.get("code_challenge"), query.get("code_challenge_method")
        if (challenge or challenge_method) and (not challenge or challenge_method != "S256"):
            return back(error="invalid_request", error_description="code_challenge_method must be S256")
        decision = query.get("decision")
        if decision is None:
            return 200, _PAGE, _consent_page(query)
        if decision != "accept":
            return back(error="access_denied")
        code = "AQ-code-" + secrets.token_urlsafe(24)
        self._logins[code] = {"redirect_uri": redirect_uri, "code_challenge": challenge}
        return back(code=code)

    def _redeem(self, form: dict[str, str]):
        """Spotify's checks on a code /authorize issued; None when it may be swapped. It works once."""
        login, self._logins[form["code"]] = self._logins[form["code"]], None

        def invalid_grant(description: str):
            return 400, {}, json.dumps({"error": "invalid_grant", "error_description": description}).encode()

        if login is None:
            return invalid_grant("Invalid authorization code")
        if form.get("redirect_uri") != login["redirect_uri"]:
            return invalid_grant("Invalid redirect URI")
        if login["code_challenge"] is not None:
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != login["code_challenge"]:
                return invalid_grant("code_verifier was incorrect")
        return None

    def _me(self, authorization: str):
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            return 401, _CORS, json.dumps({"error": {"status": 401, "message": "No token provided"}}).encode()
        if token not in self._access_tokens:
            return 401, _CORS, json.dumps({"error": {"status": 401, "message": "Invalid access token"}}).encode()
        profile = {"display_name": self.display_name, "id": "stand-in-user", "type": "user"}
        return 200, _CORS, json.dumps(profile).encode()


def _refused_credentials(authorization: str) -> str | None:
    """Spotify's description when it refuses the client's credentials (a 400 invalid_client), else None."""
    scheme, _, encoded = authorization.partition(" ")
    try:
        client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except ValueError:
        return "Invalid client"
    if scheme.lower() != "basic" or client_id != CLIENT_ID:
        return "Invalid client"
    if secret != CLIENT_SECRET:
        return "Invalid client secret"
    return None


_FAULT_ANSWERS = {
    "fault-500": (500, {"Content-Type": "text/html"}, b"<html><body>Internal error</body></html>"),
    "fault-429": (429, {"Retry-After": "7"}, b""),
    "fault-400": (400, {}, b'{"error": "invalid_request", "error_description": "Invalid request"}'),
    "fault-html": (200, {"Content-Type": "text/html"}, b"<html>hello</html>"),
    "fault-noaccess": (200, {}, b'{"token_type": "Bearer", "expires_in": 3600}'),
}


class _Connection(asyncio.Protocol):
    def __init__(self, fake: FakeAccounts):
        self.fake = fake
        self.buffer = b""
        self.first = True
        # Both set by connection_made, which asyncio calls before anything else.
        self.transport: asyncio.Transport
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str], bytes]]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake.connections += 1
        self.fake._open.add(self)
        self.queue = asyncio.Queue()
        self.worker = asyncio.ensure_future(self._answer_in_order())

    def connection_lost(self, exc) -> None:
        self.fake._open.discard(self)
        self.worker.cancel()

    def close(self) -> None:
        self.worker.cancel()
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.queue.put_nowait((method, path, headers, body))

    async def _answer_in_order(self) -> None:
        while True:
            method, path, headers, body = await self.queue.get()
            control = path.startswith("/_")
            delay = 0.0 if control else self.fake.latency
            if self.first and not control:
                delay += self.fake.connect_delay
            self.first = False
            if delay:
                await asyncio.sleep(delay)
            answer = self.fake.answer(method, path, headers, body)
            if isinstance(answer, str):
                if answer == "fault-reset":
                    self._reset()
                    return
                if answer == "fault-timeout":
                    await asyncio.sleep(60)
                    self.transport.close()
                    return
                if answer == "fault-trickle":
                    await self._trickle(self.fake.answer(method, path, headers, body, faults=False))
                    continue
                if answer.startswith("fault-slow"):
                    await asyncio.sleep(_slow_seconds(answer))
                    answer = self.fake.answer(method, path, headers, body, faults=False)
                elif answer.startswith("fault-429-"):
                    answer = (429, {"Retry-After": answer[len("fault-429-"):]}, b"")
                else:
                    answer = _FAULT_ANSWERS[answer]
            self.transport.write(_http_answer(*answer))

    async def _trickle(self, answer: tuple) -> None:
        for position, byte in enumerate(_http_answer(*answer)):
            if self.transport.is_closing():
                return
            self.transport.write(bytes([byte]))
            if position > 20:  # the status line at once, then the rest byte by byte
                await asyncio.sleep(0.3)

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()


_HTML = {"Content-Type": "text/html; charset=utf-8"}
_CORS = {"Access-Control-Allow-Origin": "*"}
# The stand-in's pages wear the service's page style, dark mode included: the same file, inlined (this is another
# origin), allowed by its hash and nothing else. No form-action: the consent form's answer redirects to the app.
_STYLE = (Path(__file__).resolve().parent.parent / "static" / "page.css").read_text()
_PAGE = {
    **_HTML,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
        + "'; img-src data:; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


def _page(body: str) -> bytes:
    # No favicon request: it would be a 404 in the browser's console.
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>Stand-in for Spotify</title><style>{_STYLE}</style></head><body><main>{body}</main></body></html>"
    ).encode()


def _consent_page(query: dict[str, str]) -> bytes:
    fields = "".join(
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, value in query.items()
    )
    return _page(
        "<h1>Stand-in for Spotify</h1>"
        '<p class="notice">This is <code>devtools/fake_accounts.py</code>, not Spotify: there is no account and no '
        "password.</p>"
        f"<p><code>{html.escape(query.get('client_id', ''))}</code> asks for "
        f"<code>{html.escape(query.get('scope', '') or '(no scope)')}</code>.</p>"
        f'<form method="get" action="/authorize">{fields}'
        '<p><button name="decision" value="accept">Agree</button> '
        '<button name="decision" value="deny" class="secondary">Cancel</button></p></form>'
    )


def describe(url: str) -> str:
    """What a person should know about a stand-in running at url."""
    return (
        f"Stand-in for Spotify (devtools/fake_accounts.py) at {url}: NOT Spotify. No account needed; codes and\n"
        f"tokens are fake. Login {url}/authorize (Agree or Cancel), tokens {url}/api/token,\n"
        f"Web API {url}/v1/me, client ID {CLIENT_ID}."
    )


def _http_answer(status: int, extra: dict[str, str], payload: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Length: {len(payload)}"]
    if "Content-Type" not in extra:
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in extra.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def _slow_seconds(fault: str) -> float:
    """fault-slow waits 1 second, fault-slow-N waits N."""
    _, _, seconds = fault.partition("fault-slow-")
    return float(seconds) if seconds else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--connect-delay", type=float, default=0.0, help="extra seconds on each new connection")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a fresh self-signed certificate")
    parser.add_argument("--fault", default=None)
    parser.add_argument("--refresh-token-lifetime", type=float, default=None,
                        help="seconds after its swap that a refresh token is refused (default: never)")
    parser.add_argument("--ready-file", help="write {url, cert} here once listening")
    args = parser.parse_args()
    fake = FakeAccounts(latency=args.latency, connect_delay=args.connect_delay, fault=args.fault,
                        tls=args.tls, port=args.port, record=False,
                        refresh_token_lifetime=args.refresh_token_lifetime)

    async def run() -> None:
        await fake.serve()
        info = json.dumps({"url": fake.url, "cert": fake.cert_file, "pid": os.getpid()})
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as out:
                out.write(info)
            os.replace(args.ready_file + ".tmp", args.ready_file)
        print(info, flush=True)
        print(describe(fake.url), file=sys.stderr)
        print(f"Point a service at it: SPOTIFY_ACCOUNTS_URL={fake.url} SPOTIFY_API_URL={fake.url} "
              f"SPOTIFY_CLIENT_ID={CLIENT_ID} SPOTIFY_CLIENT_SECRET={CLIENT_SECRET}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
