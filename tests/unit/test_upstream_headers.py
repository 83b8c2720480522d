from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import AccountConfig
from gateway.upstream import Account, forward_headers, patched_body


def account(provider: str = "openai") -> Account:
    return Account.from_config(
        AccountConfig(
            name="a", provider=provider, base_url="http://127.0.0.1:1/v1/", api_key="sk-account"
        )  # type: ignore[arg-type]
    )


def test_client_credentials_and_hop_by_hop_are_dropped() -> None:
    client = [
        (b"authorization", b"Bearer sk-client"),
        (b"x-api-key", b"sk-client"),
        (b"cookie", b"session=1"),
        (b"connection", b"keep-alive, x-custom-hop"),
        (b"x-custom-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"x-goog-api-key", b"g"),
        (b"x-my-auth-token", b"t"),
        (b"content-type", b"application/json"),
        (b"anthropic-beta", b"prompt-caching"),
    ]
    out = dict(forward_headers(client, account()))
    assert out["authorization"] == "Bearer sk-account"
    assert "sk-client" not in repr(out)
    for dropped in (
        "cookie",
        "x-custom-hop",
        "transfer-encoding",
        "x-goog-api-key",
        "x-my-auth-token",
        "x-api-key",
    ):
        assert dropped not in out
    assert out["content-type"] == "application/json"
    assert out["anthropic-beta"] == "prompt-caching"


def test_anthropic_accounts_use_x_api_key_and_a_version() -> None:
    out = dict(forward_headers([(b"authorization", b"Bearer sk-client")], account("anthropic")))
    assert out["x-api-key"] == "sk-account"
    assert "authorization" not in out
    assert out["anthropic-version"]


def test_account_repr_hides_the_key() -> None:
    assert "sk-account" not in repr(account())


def test_unpatched_body_is_forwarded_byte_exact() -> None:
    raw = b'{ "model" : "m",  "messages": [] }'
    assert patched_body(raw, {}, orjson.loads(raw)) is raw


def test_new_fields_are_spliced_without_reencoding() -> None:
    raw = b'{ "model" : "m",  "messages": [] }'
    out = patched_body(raw, {"stream_options": {"include_usage": True}}, orjson.loads(raw))
    assert out.endswith(b'"model" : "m",  "messages": [] }')
    assert orjson.loads(out) == {
        "model": "m",
        "messages": [],
        "stream_options": {"include_usage": True},
    }


def test_existing_field_is_replaced() -> None:
    raw = b'{"model":"m","stream_options":{"x":1}}'
    out = patched_body(raw, {"stream_options": {"x": 1, "include_usage": True}}, orjson.loads(raw))
    assert orjson.loads(out)["stream_options"] == {"x": 1, "include_usage": True}


def test_splice_into_empty_object() -> None:
    assert orjson.loads(patched_body(b" {} ", {"a": 1}, {})) == {"a": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=3),
)
def test_patched_body_equals_merge(body: dict[str, object], patch: dict[str, object]) -> None:
    raw = orjson.dumps(body)
    assert orjson.loads(patched_body(raw, patch, body)) == {**body, **patch}


def test_openai_rate_limit_headers_are_read() -> None:
    from gateway.upstream import rate_limit_headers

    got = rate_limit_headers(
        {
            "x-ratelimit-remaining-requests": "41",
            "x-ratelimit-remaining-tokens": "1200",
            "x-ratelimit-reset-requests": "1m30.5s",
        }
    )
    assert got == (41, 1200, 90.5)


def test_anthropic_rate_limit_headers_are_read() -> None:
    import time
    from datetime import UTC, datetime

    from gateway.upstream import rate_limit_headers

    reset = datetime.fromtimestamp(time.time() + 20, UTC).isoformat().replace("+00:00", "Z")
    got = rate_limit_headers(
        {
            "anthropic-ratelimit-requests-remaining": "7",
            "anthropic-ratelimit-input-tokens-remaining": "9000",
            "anthropic-ratelimit-requests-reset": reset,
        }
    )
    assert got is not None and got[:2] == (7, 9000)
    assert got[2] is not None and 18 < got[2] <= 20


def test_no_or_garbled_rate_limit_headers() -> None:
    from gateway.upstream import rate_limit_headers

    assert rate_limit_headers({"content-type": "application/json"}) is None
    assert rate_limit_headers(
        {"x-ratelimit-remaining-requests": "many", "x-ratelimit-reset-requests": "soon"}
    ) == (
        None,
        None,
        None,
    )


header_names = st.sampled_from(
    [
        "authorization",
        "x-api-key",
        "cookie",
        "connection",
        "te",
        "x-custom",
        "x-goog-api-key",
        "proxy-authorization",
        "content-type",
        "x-auth-token",
        "api-key",
        "x-session-id",
        "upgrade",
    ]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=20)


@given(
    st.lists(
        st.tuples(header_names, st.text(alphabet="abcdefghijk ,-_=;", max_size=30)), max_size=12
    )
)
def test_header_filter_never_forwards_credentials(client: list[tuple[str, str]]) -> None:
    raw = [(n.encode(), v.encode()) for n, v in client]
    out = forward_headers(raw, account())
    names = [n for n, _ in out]
    assert names.count("authorization") == 1 and dict(out)["authorization"] == "Bearer sk-account"
    hop = {"connection", "te", "upgrade", "transfer-encoding", "keep-alive", "cookie", "host"}
    listed = {t.strip().lower() for n, v in client if n == "connection" for t in v.split(",")}
    for name in names:
        if name in ("authorization", "accept-encoding"):
            continue
        assert name not in hop and name not in listed
        assert not any(h in name for h in ("auth", "key", "token", "secret", "cookie", "session"))
