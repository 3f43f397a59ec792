"""Property tests: whatever arrives, the answer is JSON, never a 5xx, and junk never reaches Spotify."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlencode

import pytest
import responses
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from api import REFRESH_PATHS, SWAP_PATHS
from crypto import InvalidToken
from devtools.fake_accounts import CLIENT_ID
from tests.helpers import BASE_CONFIG, SEALER, TOKEN_URL, app_for

# Enough examples for each shape of input to be met many times over; the fast tier's time (docs/decisions.md,
# "Tests") is what bounds them.
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# What the service accepts, written down independently of app.py: the contract under test.
CALLBACKS = tuple(BASE_CONFIG["SPOTIFY_CLIENT_CALLBACK_URL"].split(","))
OPAQUE = re.compile(r"[\x21-\x7e]{1,4096}")  # a code: printable ASCII, no spaces, at most 4 KiB
VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 section 4.1
MAX_BODY = 64 * 1024
TOKENS = {"access_token": "BQ-access", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "AQ-new"}

# Genuine Spotify refresh tokens, and the sealed tokens a client would hold for them.
RAW_REFRESH = ("AQ-raw-refresh-one", "AQ-raw-refresh-two")
GENUINE = tuple(SEALER.seal(raw) for raw in RAW_REFRESH)

ROUTES = SWAP_PATHS + REFRESH_PATHS + ("/health",)
# The landing page (page.py) and its icon, for GET and HEAD; every other method is a JSON 405.
PAGES = {"/": "text/html", "/callback": "text/html", "/favicon.ico": "image/svg+xml"}
SWAP_FIELDS = ("code", "redirect_uri", "code_verifier")


@pytest.fixture(scope="module")
def client():
    """The service with its failure limit off, so that thousands of junk requests are all judged alike."""
    # Built before the per-test environment cleanup runs: blank every variable the shell might set.
    return app_for(BASE_CONFIG).test_client()


@contextmanager
def spotify() -> Iterator[responses.RequestsMock]:
    """Spotify, answering every call with fresh tokens, and recording it."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=TOKENS)
        yield mock


def sent_forms(mock: responses.RequestsMock) -> list[dict[str, list[str]]]:
    return [parse_qs(_text(call.request.body), keep_blank_values=True) for call in mock.calls]


def _text(body: bytes | str | None) -> str:
    return body.decode() if isinstance(body, bytes) else body or ""


def assert_answer_shape(response, method: str) -> dict:
    """Never a 5xx; JSON with exactly that media type unless the answer has no body by its nature."""
    assert response.status_code < 500, response.get_data()
    if method == "HEAD":
        assert response.get_data() == b""
        assert response.headers["Content-Type"] == "application/json"
        return {}
    if method == "OPTIONS" and response.status_code == 204:
        assert response.get_data() == b"" and "Content-Type" not in response.headers
        return {}
    assert response.headers["Content-Type"] == "application/json", response.headers
    body = json.loads(response.get_data())
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert isinstance(body.get("error"), str) and body["error"]
    return body


def assert_forwarded_only_what_is_valid(mock: responses.RequestsMock) -> None:
    """Whatever did reach Spotify passed every check the contract makes."""
    for form in sent_forms(mock):
        grant = form["grant_type"]
        if grant == ["authorization_code"]:
            assert len(form["code"]) == 1 and OPAQUE.fullmatch(form["code"][0]), form
            assert form["redirect_uri"][0] in CALLBACKS
            for verifier in form.get("code_verifier", []):
                assert VERIFIER.fullmatch(verifier)
        else:
            assert grant == ["refresh_token"] and form["refresh_token"][0] in RAW_REFRESH, form


# -- strategies --------------------------------------------------------------------------------

printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80)
any_text = st.text(max_size=80)
long_text = st.integers(4090, 4200).map(lambda n: "c" * n)
odd_text = st.sampled_from(["", " ", "\x00", "code\x00", "a b", "\t", "\u00e9t\u00e9", "\U0001f600", "%00", "\r\n"])
verifiers = st.text(st.sampled_from("ABCxyz0189._~-"), min_size=40, max_size=131)
grant_types = ("authorization_code", "refresh_token", "client_credentials", "password")
text_values = st.one_of(
    printable, any_text, long_text, odd_text, verifiers,
    st.sampled_from(CALLBACKS + GENUINE + grant_types + (CLIENT_ID, "other-client-id")),
)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text_values)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    SWAP_FIELDS + ("refresh_token", "grant_type", "client_id", "client_secret", "scope", "", "Code", "x")
)

valid_verifiers = st.text(st.sampled_from("AZaz09._~-"), min_size=43, max_size=128)


@st.composite
def near_valid(draw, values: st.SearchStrategy) -> dict:
    """Fields a real client would send for either grant, then up to two of them spoiled (or not)."""
    fields = {"code": draw(printable), "refresh_token": draw(st.sampled_from(GENUINE))}
    if draw(st.booleans()):
        fields["redirect_uri"] = draw(st.sampled_from(CALLBACKS + ("",)))
    if draw(st.booleans()):
        fields["code_verifier"] = draw(valid_verifiers)
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(field_names)] = draw(values)
    return fields


# A JSON object's fields: any JSON value, any shape.
json_fields = st.dictionaries(field_names, json_values, max_size=5) | near_valid(json_values)
# A form's fields: strings, and a name may repeat.
form_fields = st.lists(st.tuples(field_names, text_values), max_size=6) | st.tuples(
    near_valid(text_values).map(lambda fields: list(fields.items())),
    st.lists(st.tuples(field_names, text_values), max_size=2),
).map(lambda parts: parts[0] + parts[1])

JSON_TYPES = ("application/json", "application/json; charset=utf-8", "application/vnd.api+json", "Application/JSON")
FORM_TYPES = ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=UTF-8")


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


raw_bodies = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8")),
    form_fields.map(lambda pairs: urlencode(pairs).encode()),
    st.integers(1, 20_000).map(deep),
    st.integers(1, 20_000).map(lambda n: b'{"code":' * n + b"1" + b"}" * n),
    st.integers(MAX_BODY - 10, MAX_BODY + 10_000).map(lambda n: b"code=" + b"c" * n),
    st.sampled_from([b"", b"code", b"code=", b"code=%", b"code=%zz", b"code=a&code=b", b"\xff\xfe", b"{", b"null"]),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        JSON_TYPES
        + FORM_TYPES
        + (
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "text/plain",
            "text/plain; charset=latin-1",
            "application/json; charset=utf-16",
            "application/octet-stream",
            "application/x-www-form-urlencoded; charset=latin-1",
            "*/*",
            ";;;",
            "application/",
        )
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)
methods = st.one_of(
    st.sampled_from(["POST"] * 6 + ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT"]),
    st.from_regex(r"[A-Z]{1,12}", fullmatch=True),
)
paths = st.one_of(
    st.sampled_from(ROUTES),
    st.sampled_from(ROUTES).map(lambda p: p + "/"),
    st.sampled_from(ROUTES).map(lambda p: p.upper()),
    st.sampled_from(sorted(PAGES)),
    st.sampled_from(["//swap", "/api//token", "/api", "/swap/../refresh", "/%00", "/static/x", "/health/"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#%"), max_size=40).map(
        lambda p: "/" + p
    ),
)


# -- the oracle --------------------------------------------------------------------------------


class Refusal(Exception):
    """The request breaks the contract's input rules: 400 with this error, Spotify not called."""

    error = "invalid_request"


class Malformed(Refusal):
    error = "invalid_request"


class Unsupported(Refusal):
    error = "unsupported_grant_type"


class OtherClient(Refusal):
    error = "invalid_client"


def single(fields: MultiDict | dict, name: str) -> str | None:
    """The one value of a field as the service reads it: None when missing or empty."""
    if isinstance(fields, MultiDict):
        values = fields.getlist(name)
        if len(values) > 1:
            raise Malformed
        value = values[0] if values else None
    else:
        value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Malformed
    return value


def expected_swap(fields: MultiDict | dict) -> dict[str, str]:
    """The form the service must send to Spotify for these swap fields; Malformed if it must not."""
    code = single(fields, "code")
    if code is None or not OPAQUE.fullmatch(code):
        raise Malformed
    redirect_uri = single(fields, "redirect_uri") or CALLBACKS[0]
    if redirect_uri not in CALLBACKS:
        raise Malformed
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    verifier = single(fields, "code_verifier")
    if verifier is not None:
        if not VERIFIER.fullmatch(verifier):
            raise Malformed
        form["code_verifier"] = verifier
    return form


def expected(path: str, fields: MultiDict | dict) -> dict[str, str] | None:
    """The form for Spotify; None when the token is not one this service sealed; Refusal if none is sent."""
    grant = single(fields, "grant_type")
    if grant not in (None, "authorization_code", "refresh_token"):
        raise Unsupported
    client_id = single(fields, "client_id")
    if client_id is not None and client_id != CLIENT_ID:
        raise OtherClient
    if grant == "authorization_code" or (grant is None and path in SWAP_PATHS):
        return expected_swap(fields)
    return expected_refresh(fields, code_is_token=grant is None)


def expected_refresh(fields: MultiDict | dict, code_is_token: bool) -> dict[str, str] | None:
    """The form for Spotify; None when the token is not one this service sealed; Malformed when absent."""
    token = single(fields, "refresh_token")
    if token is None and code_is_token and single(fields, "code") in GENUINE:
        token = single(fields, "code")  # SpotifyAPI-NET's guide sends the sealed token as `code`
    if token is None:
        raise Malformed
    if token not in GENUINE:
        return None
    return {"grant_type": "refresh_token", "refresh_token": RAW_REFRESH[GENUINE.index(token)]}


def check_structured(client, path: str, fields: MultiDict | dict, **request) -> None:
    with spotify() as mock:
        response = client.post(path, **request)
        body = assert_answer_shape(response, "POST")
        sent = [{k: v[0] for k, v in form.items()} for form in sent_forms(mock)]
    if isinstance(request["data"], bytes) and len(request["data"]) > MAX_BODY:
        event("too large")
        assert (response.status_code, body["error"], sent) == (413, "invalid_request", [])
        return
    try:
        form = expected(path, fields)
    except Refusal as refusal:
        event(refusal.error)  # --hypothesis-show-statistics: how often each outcome was exercised
        assert (response.status_code, body["error"], sent) == (400, refusal.error, []), (fields, body)
        return
    event("not sealed here" if form is None else "forwarded")
    if form is None:
        assert (response.status_code, body["error"], sent) == (400, "invalid_grant", []), (fields, body)
        return
    assert response.status_code == 200, body
    assert sent == [form]
    assert body["access_token"] == "BQ-access"
    assert SEALER.open(body["refresh_token"]).refresh_token == "AQ-new"


# -- the properties ----------------------------------------------------------------------------


@FUZZ
@given(
    path=st.sampled_from(SWAP_PATHS + REFRESH_PATHS),
    fields=json_fields,
    content_type=st.sampled_from(JSON_TYPES),
    # RFC 8259 says UTF-8, but a JSON parser may accept UTF-16 and UTF-32 (Python's does): same answer.
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-32", "ascii"]),
)
@example(path="/swap", fields={"code": "c", "redirect_uri": 0}, content_type="application/json", encoding="utf-8")
@example(path="/refresh", fields={"refresh_token": GENUINE[0]}, content_type="application/json", encoding="utf-16")
def test_json_objects_of_any_shape(client, path, fields, content_type, encoding):
    text = json.dumps(fields, ensure_ascii=encoding == "ascii")
    check_structured(client, path, fields, data=text.encode(encoding), content_type=content_type)


@FUZZ
@given(
    path=st.sampled_from(SWAP_PATHS + REFRESH_PATHS),
    pairs=form_fields,
    encoding=st.sampled_from(FORM_TYPES + ("multipart/form-data",)),
)
@example(path="/api/token", pairs=[("code", "a"), ("code", "a")], encoding=FORM_TYPES[0])
@example(path="/swap", pairs=[("code", "ok"), ("code_verifier", "v" * 43)], encoding="multipart/form-data")
def test_form_fields_of_any_value(client, path, pairs, encoding):
    fields = MultiDict(pairs)
    if encoding.startswith("multipart/"):
        request = {"data": fields, "content_type": encoding}
    else:
        request = {"data": urlencode(pairs).encode(), "content_type": encoding}
    check_structured(client, path, fields, **request)


@FUZZ
@given(value=json_values.filter(lambda v: not isinstance(v, dict)), path=st.sampled_from(SWAP_PATHS + REFRESH_PATHS))
def test_json_that_is_not_an_object_is_invalid_request(client, value, path):
    with spotify() as mock:
        response = client.post(path, data=json.dumps(value), content_type="application/json")
        assert len(mock.calls) == 0
    assert response.status_code == 400
    assert assert_answer_shape(response, "POST")["error"] == "invalid_request"


@FUZZ
@given(method=methods, path=paths, content_type=content_types, body=raw_bodies)
@example(method="POST", path="/swap", content_type="application/json", body=deep(5000))
@example(method="POST", path="/refresh", content_type="application/json", body=b'{"a":' * 5000 + b"1" + b"}" * 5000)
@example(method="POST", path="/swap", content_type=FORM_TYPES[0], body=b"code=" + b"c" * MAX_BODY)
@example(method="POST", path="/api//token", content_type=None, body=b"")  # merged slashes: a redirect?
@example(method="POST", path="//swap", content_type=None, body=b"")
@example(method="HEAD", path="/swap", content_type=None, body=b"")
@example(method="OPTIONS", path="/refresh", content_type=None, body=b"")
@example(method="GET", path="/callback", content_type=FORM_TYPES[0], body=b"code=x")
@example(method="POST", path="/", content_type=FORM_TYPES[0], body=b"code=x")
def test_anything_on_any_path_is_answered_in_json_without_a_5xx(client, method, path, content_type, body):
    headers = {} if content_type is None else {"Content-Type": content_type}
    with spotify() as mock:
        # PATH_INFO as a server would pass it: the test client would read "//x" as a host name.
        response = client.open("/", method=method, data=body, headers=headers, environ_overrides={"PATH_INFO": path})
        if path in PAGES and method in ("GET", "HEAD"):
            assert (response.status_code, response.mimetype) == (200, PAGES[path])
            response.close()
            assert len(mock.calls) == 0
            return
        answer = assert_answer_shape(response, method)
        assert_forwarded_only_what_is_valid(mock)
        called = len(mock.calls)
    if len(body) > MAX_BODY and method == "POST" and path in SWAP_PATHS + REFRESH_PATHS:
        assert response.status_code == 413 and called == 0
    if response.status_code == 200 and path != "/health":
        assert called == 1 and answer["access_token"] == "BQ-access"
    if path not in SWAP_PATHS + REFRESH_PATHS:
        assert called == 0


# -- sealed-token mutations --------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


@st.composite
def mutated_tokens(draw) -> str:
    """A sealed token with one change: a flipped bit, cut short, lengthened, spliced, recased, or a char inserted."""
    token = draw(st.sampled_from(GENUINE))
    other = GENUINE[1 - GENUINE.index(token)]
    kind = draw(st.sampled_from(["flip-byte", "flip-char", "truncate", "extend", "splice", "case", "insert"]))
    if kind == "flip-byte":
        data = bytearray(unb64url(token))
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
        mutated = b64url(bytes(data))
    elif kind == "flip-char":
        at, bit = draw(st.integers(0, len(token) - 1)), draw(st.integers(0, 6))
        mutated = token[:at] + chr(ord(token[at]) ^ (1 << bit)) + token[at + 1 :]
    elif kind == "truncate":
        mutated = token[: draw(st.integers(0, len(token) - 1))]
    elif kind == "extend":
        mutated = token + draw(st.text(min_size=1, max_size=40))
    elif kind == "splice":
        mutated = token[: draw(st.integers(0, len(token)))] + other[draw(st.integers(0, len(other))) :]
    elif kind == "case":
        letters = [i for i, c in enumerate(token) if c.isalpha()]
        at = draw(st.sampled_from(letters))
        mutated = token[:at] + token[at].swapcase() + token[at + 1 :]
    else:
        at = draw(st.integers(0, len(token)))
        mutated = token[:at] + draw(st.characters()) + token[at:]
    # A splice can rebuild a whole genuine token; that is not a mutation.
    return draw(st.just(mutated).filter(lambda t: t not in GENUINE))


@settings(max_examples=500, deadline=None, database=None)
@given(token=mutated_tokens())
def test_any_mutation_of_a_sealed_token_does_not_open(token):
    """At the layer that owns it, the crypto layer: a token that does not open is 400 invalid_grant without a call
    to Spotify, whichever way it was broken (test_app.py holds that mapping, once)."""
    with pytest.raises(InvalidToken):
        SEALER.open(token)


def test_the_unmutated_tokens_do_open(client):
    """The mutation test would pass vacuously if the genuine tokens were rejected too."""
    for token, raw in zip(GENUINE, RAW_REFRESH, strict=True):
        assert SEALER.open(token).refresh_token == raw
        with spotify() as mock:
            assert client.post("/refresh", data={"refresh_token": token}).status_code == 200
            assert sent_forms(mock) == [{"grant_type": ["refresh_token"], "refresh_token": [raw]}]
