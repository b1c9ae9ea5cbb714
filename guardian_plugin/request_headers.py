"""The request headers the identity is read from: real headers only, and never an ambiguous one.

TorchServe's worker hands the handler one dict per request that mixes two things (ts/service.py): the
request's multipart part names and gRPC input keys, each with a dict value ``{"content-type": ...}``,
then the request's real headers, with str values. A part is body content the client chose freely, so
a part named ``x-client-id`` must not stand in for the ``X-Client-Id`` header (nor for the gateway's
secret header or the API key header). :func:`real_headers` keeps the str/bytes values only; a part
named exactly like a real header is overwritten by it in that dict, and one without a real header
beside it is dropped.

HTTP header names are case-insensitive, and TorchServe keeps the client's casing, so ``X-Client-Id:
alice`` and ``x-client-id: bob`` both reach the worker; starlette (BentoML) keeps both too. Picking one
would let the sender choose which identity counts, so :func:`identity_headers` answers such a request
400 ``AmbiguousIdentity`` when one of the identity's own headers carries two different values.
(TorchServe's frontend keeps only the last of two headers spelled in the same case: that ambiguity
never reaches the worker; a gateway in front should reject it.)
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from guardian_plugin.identity import IdentityError

# headers TorchServe's frontend itself adds to a request (sequence batching; ConfigManager's
# ts_header_key_sequence_* defaults): they say nothing about who sent it
TORCHSERVE_OWN_HEADERS = frozenset({"ts_request_sequence_id", "ts_request_sequence_start", "ts_request_sequence_end"})


def _text(v, encoding: str = "latin-1") -> str:
    return v.decode(encoding, "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def real_headers(headers) -> List[Tuple[str, str]]:
    """(name, value) pairs of the real headers in ``headers`` (a mapping, a starlette Headers, or a list
    of pairs): entries with a str or bytes value; TorchServe's part and input-key entries (dict values)
    and anything else are left out."""
    if headers is None:
        return []
    items = headers.items() if hasattr(headers, "items") else headers
    return [(_text(k), _text(v, "utf-8")) for k, v in items if isinstance(v, (str, bytes, bytearray))]


def identity_names(cfg) -> List[str]:
    """The headers an IdentityConfig reads: the API key header alone, or the id headers and the
    gateway's secret header."""
    if cfg.api_key_header:
        return [cfg.api_key_header]
    names = list(cfg.headers)
    if cfg.trusted_proxy is not None:
        names.append(cfg.trusted_proxy.secret_header)
    return names


def identity_headers(headers, names: Iterable[str]) -> Dict[str, str]:
    """The real headers of a request as ``{lower-case name: value}``, for Identity.client_id. Raises
    IdentityError 400 ``AmbiguousIdentity`` when one of ``names`` comes with two different values
    (spelled in different cases, or repeated); a header repeated with the same value is fine."""
    wanted = {n.lower(): n for n in names}
    out: Dict[str, str] = {}
    for k, v in real_headers(headers):
        key = k.lower()
        seen: Optional[str] = out.get(key)
        if seen is not None and key in wanted and seen.strip() != v.strip():
            raise IdentityError(400, "AmbiguousIdentity",
                                f"the request carries the {wanted[key]} header more than once with different "
                                "values (header names are case-insensitive): send it once")
        out.setdefault(key, v)
    return out


def has_client_headers(headers: Mapping) -> bool:
    """Whether ``headers`` (real headers only, see :func:`real_headers`) holds any header beyond the
    sequence headers TorchServe's gRPC StreamPredictions2 adds. Checked against TorchServe 0.12: every
    HTTP prediction request has some (the frontend adds ``explain`` and ``url_path``, Netty
    ``content-length``, even when the client sent no header at all); a gRPC call has none, since
    TorchServe passes no gRPC metadata to the worker."""
    return any(str(k).lower() not in TORCHSERVE_OWN_HEADERS for k in headers)
