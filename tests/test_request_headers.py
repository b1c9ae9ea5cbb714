"""guardian_plugin.request_headers on the header maps the adapters really hand it: TorchServe's mixed
map (part names with dict values, real headers with str values; the shapes printed by a real 0.12
worker, docs/torchserve.md), starlette's Headers (BentoML)."""

from __future__ import annotations

import pytest

from guardian_plugin.config import IdentityConfig
from guardian_plugin.identity import Identity, IdentityError
from guardian_plugin.request_headers import has_client_headers, identity_headers, identity_names, real_headers

# a multipart request to a real TorchServe 0.12 with a part named X-Client-Id and the header x-client-id
TS_HTTP = {"data": {"content-type": "application/octet-stream"}, "x-client-id": "bob",
           "X-Client-Id": {"content-type": "alice"}, "explain": "False", "Host": "127.0.0.1:8080", "url_path": ""}
TS_GRPC = {"X-Client-Id": {"content-type": ""}, "data": {"content-type": ""}}  # a gRPC Predictions call


def test_only_string_values_are_headers():
    assert dict(real_headers(TS_HTTP)) == {"x-client-id": "bob", "explain": "False", "Host": "127.0.0.1:8080",
                                           "url_path": ""}
    assert real_headers(TS_GRPC) == [] and real_headers(None) == []
    assert real_headers({b"X-Client-Id": b"carol"}) == [("X-Client-Id", "carol")]


def test_a_part_is_never_the_identity():
    ident = Identity(IdentityConfig(headers=["X-Client-Id"]))
    assert ident.client_id(identity_headers(TS_HTTP, ["X-Client-Id"])) == "bob"
    with pytest.raises(IdentityError) as e:
        ident.client_id(identity_headers({"X-Client-Id": {"content-type": "alice"}}, ["X-Client-Id"]))
    assert e.value.status == 401


def test_two_values_of_an_identity_header_are_ambiguous():
    names = ["X-Client-Id"]
    with pytest.raises(IdentityError) as e:
        identity_headers({"X-Client-Id": "a", "x-client-id": "b"}, names)
    assert (e.value.status, e.value.kind) == (400, "AmbiguousIdentity")
    assert identity_headers({"X-Client-Id": "a", "x-client-id": " a"}, names) == {"x-client-id": "a"}
    # other headers may repeat: the first is kept, nothing is refused
    assert identity_headers([("accept", "a"), ("Accept", "b"), ("X-Client-Id", "c")], names)["accept"] == "a"


def test_starlette_headers_keep_both_values():
    from starlette.datastructures import Headers

    h = Headers(raw=[(b"x-client-id", b"a"), (b"x-client-id", b"b")])  # ASGI lower-cases every name
    with pytest.raises(IdentityError):
        identity_headers(h, ["X-Client-Id"])


def test_identity_names_follow_the_mode():
    assert identity_names(IdentityConfig(api_key_header="X-Api-Key", headers=["X-Client-Id"])) == ["X-Api-Key"]
    cfg = IdentityConfig(headers=["X-Client-Id"], trusted_proxy={"secret_header": "X-Gw"})
    assert identity_names(cfg) == ["X-Client-Id", "X-Gw"]


def test_grpc_calls_have_no_client_headers():
    assert not has_client_headers(dict(real_headers(TS_GRPC)))
    assert not has_client_headers({"ts_request_sequence_id": "s1", "ts_request_sequence_start": "true"})
    # an HTTP/1.0 request without any header, as a real TorchServe 0.12 worker sees it
    assert has_client_headers({"explain": "False", "content-length": "0", "url_path": ""})
