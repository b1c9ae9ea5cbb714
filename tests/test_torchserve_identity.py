"""Identity from real headers only, and gRPC, against a REAL TorchServe 0.12 (2 workers per guarded
model, batch size 8 from the `models=` line that `guardian protect` prints).

TorchServe's worker gets the request's multipart part names (and gRPC input keys) in the same map as
its real headers. Here a part named like an identity header -- X-Client-Id, the gateway's secret header,
the API key header, in every letter case -- must never change who the request is counted as; an
identity header sent twice with different values is a 400; and a gRPC call (TorchServe passes no gRPC
metadata to the worker) is never answered by a guarded model, whatever it sends and whoever it is.

One server for the module, started from a config.properties holding the `models=` lines that
`guardian protect` printed for four archives of the example MNIST model, one per identity mode.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.cli import main  # noqa: E402
from guardian_plugin.devserver.torchserve import TorchServe, build_archive  # noqa: E402
from serving_fixtures import post_exact_headers, spoofing_parts, torchserve_grpc  # noqa: E402

TAU, WORKERS, BATCH = 4, 2, 8
KEY_SECRET = "identity-test-key-secret-0123456789"
SECRET = "gateway-secret-0123456789abcdef"
IDENTITY = {  # model name -> its guard config's identity section
    "hdr": {"headers": ["X-Client-Id"], "missing": "reject"},
    "gw": {"headers": ["X-Client-Id"], "trusted_proxy": {"secret_header": "X-Gateway-Secret"}, "missing": "reject"},
    "key": {"api_key_header": "X-Api-Key", "key_secret": KEY_SECRET, "missing": "reject"},
    "anon": {"headers": ["X-Client-Id"], "missing": "anonymous"},
}


def _wait_ready(ts, names, timeout_s=300.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ready = all(sum(w["status"] == "READY" for w in requests.get(f"{ts.management_url}/models/{n}", timeout=10)
                            .json()[0]["workers"]) >= WORKERS for n in names)
        except (requests.RequestException, KeyError, IndexError, ValueError):
            ready = False
        if ready:
            return
        time.sleep(1)
    raise RuntimeError(f"models {names} not ready after {timeout_s} s:\n{ts.log_tail(80)}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    w = tmp_path_factory.mktemp("ts_identity")
    store, build = str(w / "store"), str(w / "build")
    ledger = f"sqlite:///{w}/ledger.db"
    loads, models, printed = [], {}, {}
    for name, identity in IDENTITY.items():
        mar = build_archive(name, ex.VICTIM_TS, ex.MNIST_HANDLER, build)  # no batch settings of its own
        guard = w / f"{name}.yaml"
        guard.write_text(yaml.safe_dump({"ledger": ledger, "rule": {"tau": TAU}, "identity": identity}))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["protect", mar, "--detector", ex.DETECTOR, "--config", str(guard),
                         "-o", os.path.join(store, f"{name}_protected.mar")]) == 0
        printed[name] = out.getvalue()
        line = next(ln for ln in printed[name].splitlines() if ln.startswith("models="))
        models.update(json.loads(line[len("models="):]))
        loads.append(printed[name].split("`--models ")[1].split("`")[0])
    ts = TorchServe(store, str(w / "server"), env={"GUARDIAN_GATEWAY_SECRET": SECRET},
                    extra_config={"load_models": ",".join(loads), "models": json.dumps(models),
                                  "default_workers_per_model": str(WORKERS)})
    ts.start()
    try:
        _wait_ready(ts, list(IDENTITY))
        digits, _ = ex.real_digits(8)
        yield {"ts": ts, "w": w, "printed": printed, "loads": loads, "digits": digits,
               "fakes": ex.generator_images(3 * TAU, seed=3)}
    finally:
        ts.stop()


def _clients(served, namespace):
    con = sqlite3.connect(str(served["w"] / "ledger.db"))
    try:
        return {r[0]: r[1:] for r in con.execute(
            "SELECT client_id, queries, refused FROM clients WHERE namespace=?", (namespace,))}
    finally:
        con.close()


def _post(ts, model, image, headers=None, parts=()):
    """A multipart request: the image in part `data`, then `parts` ((name, value, content type), ...)."""
    files = [("data", ("d.png", image, "image/png"))] + [(n, (None, v, ct)) for n, v, ct in parts]
    return requests.post(f"{ts.url}/predictions/{model}", files=files, headers=headers or {}, timeout=120)


def _type(r):
    return json.loads(r.text)["type"]


def _refuse(ts, model, headers, fakes):
    for img in fakes:
        r = _post(ts, model, img, headers)
        if r.status_code == 403:
            return
        assert r.status_code == 200, r.text
    raise AssertionError(f"{headers} was never refused after {len(fakes)} generator queries")


# ------------------------------------------------------------------------------------- item 8
def test_protect_prints_the_models_line_that_torchserve_honours(served):
    """The printed line is keyed by the archive's own model name (not the .mar's file name) and its
    version; the server, started from it, runs every model with batch size 8 and 50 ms delay."""
    for name in IDENTITY:
        out = served["printed"][name]
        assert f"`--models {name}={name}_protected.mar`" in out
        line = next(ln for ln in out.splitlines() if ln.startswith("models="))
        assert json.loads(line[len("models="):]) == {name: {"1.0": {
            "defaultVersion": True, "marName": f"{name}_protected.mar", "batchSize": 8, "maxBatchDelay": 50,
            "responseTimeout": 120}}}
        assert "GrpcNotServed" in out and "grpc_inference_address" in out
        d = requests.get(f"{served['ts'].management_url}/models/{name}", timeout=10).json()[0]
        assert (d["batchSize"], d["maxBatchDelay"], d["minWorkers"]) == (BATCH, 50, WORKERS), d


# ------------------------------------------------------------------------------------- item 6
def test_parts_named_like_identity_headers_never_change_the_identity(served):
    """X-Client-Id mode: a refused client stays refused whatever parts it adds; a request without the
    header stays 401; a client's answers are counted under its header's id only, also when its requests
    are batched with others."""
    ts, digits = served["ts"], served["digits"]
    _refuse(ts, "hdr", {"X-Client-Id": "hdr-refused"}, served["fakes"])
    parts = spoofing_parts("hdr-fresh")
    r = _post(ts, "hdr", digits[0], {"X-Client-Id": "hdr-refused"}, parts)
    assert r.status_code == 403 and _type(r) == "ClientRefused", r.text
    for p in parts:  # each part alone, too
        r = _post(ts, "hdr", digits[0], {"X-Client-Id": "hdr-refused"}, [p])
        assert r.status_code == 403, (p, r.text)
        r = _post(ts, "hdr", digits[0], {}, [p])
        assert r.status_code == 401 and _type(r) == "MissingIdentity", (p, r.text)
    # concurrent: the server batches them (batch 8, 2 workers); each counted under its header only
    jobs = [(f"hdr-ok-{i % 4}", digits[i % len(digits)]) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda j: _post(ts, "hdr", j[1], {"X-Client-Id": j[0]}, spoofing_parts("hdr-other")),
                           jobs))
    assert [r.status_code for r in rs] == [200] * 16, [r.text for r in rs if r.status_code != 200]
    clients = _clients(served, "hdr")
    assert {c: q for c, (q, _) in clients.items() if c.startswith("hdr-ok")} == {f"hdr-ok-{k}": 4 for k in range(4)}
    assert set(clients) == {"hdr-refused"} | {f"hdr-ok-{k}" for k in range(4)}, clients  # no part ever counted
    assert clients["hdr-refused"][1] == 1


def test_parts_cannot_stand_in_for_the_gateway_secret(served):
    ts, digit = served["ts"], served["digits"][0]
    for p in spoofing_parts(SECRET):
        r = _post(ts, "gw", digit, {"X-Client-Id": "gw-alice"}, [p])
        assert r.status_code == 401 and _type(r) == "UntrustedGateway", (p, r.text)
    r = _post(ts, "gw", digit, {"X-Client-Id": "gw-alice", "X-Gateway-Secret": SECRET}, spoofing_parts("gw-mallory"))
    assert r.status_code == 200, r.text
    assert _clients(served, "gw") == {"gw-alice": (1, 0)}


def _issue(served, client_id):
    """An issued key of the `key` archive (namespace `key`), as `guardian keys issue` makes it."""
    from guardian_plugin.keys import open_key_store

    store = open_key_store(f"sqlite:///{served['w']}/ledger.db", "key")
    try:
        return store.issue(KEY_SECRET, client_id, client_id)[0]
    finally:
        store.close()


def test_parts_cannot_stand_in_for_the_api_key(served):
    ts, digit = served["ts"], served["digits"][0]
    someone, refused, good, fresh = (_issue(served, c) for c in ("key-of-someone", "key-refused", "key-good",
                                                                 "key-fresh"))
    for p in spoofing_parts(someone):
        r = _post(ts, "key", digit, {}, [p])
        assert r.status_code == 401 and _type(r) == "MissingIdentity", (p, r.text)
    _refuse(ts, "key", {"X-Api-Key": refused}, served["fakes"])
    r = _post(ts, "key", digit, {"X-Api-Key": refused}, spoofing_parts(fresh))
    assert r.status_code == 403 and _type(r) == "ClientRefused", r.text
    r = _post(ts, "key", digit, {"X-Api-Key": good}, spoofing_parts(fresh))
    assert r.status_code == 200
    assert set(_clients(served, "key")) == {"key:key-refused", "key:key-good"}


def test_an_identity_header_twice_with_different_values_is_ambiguous(served):
    ts, digit = served["ts"], served["digits"][0]
    hdr, key = ts.url + "/predictions/hdr", ts.url + "/predictions/key"
    status, body = post_exact_headers(hdr, [("X-Client-Id", "amb-a"), ("x-client-id", "amb-b")], digit)
    assert status == 400 and json.loads(body)["type"] == "AmbiguousIdentity", body
    status, body = post_exact_headers(key, [("X-Api-Key", "k1"), ("X-API-KEY", "k2")], digit)
    assert status == 400 and json.loads(body)["type"] == "AmbiguousIdentity", body
    status, body = post_exact_headers(hdr, [("X-Client-Id", "amb-a"), ("x-client-id", "amb-a")], digit)
    assert status == 200, body  # the same value twice is one identity
    assert "amb-b" not in _clients(served, "hdr") and _clients(served, "hdr")["amb-a"][0] == 1


# ------------------------------------------------------------------------------------- item 7
@pytest.fixture(scope="module")
def grpc_client(served):
    pytest.importorskip("grpc_tools", reason="the test extra's grpcio-tools makes the gRPC client")
    return torchserve_grpc(served["ts"].grpc_inference_port, str(served["w"] / "grpc"))


def _grpc_answer(stub, pb2, model, image, extra=None, metadata=()):
    inputs = {"data": image, **(extra or {})}
    r = stub.Predictions(pb2.PredictionsRequest(model_name=model, input=inputs), metadata=list(metadata), timeout=120)
    return json.loads(r.prediction)


def test_grpc_predictions_are_never_answered(served, grpc_client):
    """gRPC status OK (TorchServe sends one request's status only over HTTP) but no answer: the
    GrpcNotServed error, for every archive and identity mode, whatever input keys or metadata it sends;
    nothing is counted, so nothing is refused by it either."""
    stub, pb2 = grpc_client
    ts = served["ts"]
    before = {m: _clients(served, m) for m in IDENTITY}
    cases = [({}, ()), ({"X-Client-Id": b"grpc-eve"}, ()), ({}, [("x-client-id", "grpc-eve"), ("x-api-key", "k")]),
             ({"x-gateway-secret": SECRET.encode(), "X-Api-Key": b"k"}, [("x-gateway-secret", SECRET)])]
    for model in IDENTITY:
        for extra, meta in cases:
            body = _grpc_answer(stub, pb2, model, served["digits"][1], extra, meta)
            assert body["type"] == "GrpcNotServed" and body["code"] == 400, body
            assert "X-Api-Key" in body["message"] if model == "key" else "X-Client-Id" in body["message"]
    # an anonymous-mode archive too: a gRPC client sending noise is never answered (nor counted)
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda img: _grpc_answer(stub, pb2, "anon", img), served["fakes"]))
    assert [b["type"] for b in bodies] == ["GrpcNotServed"] * len(served["fakes"])
    assert {m: _clients(served, m) for m in IDENTITY} == before
    # streaming: the same
    (r,) = list(stub.StreamPredictions(pb2.PredictionsRequest(model_name="anon", input={"data": served["digits"][0]}),
                                       timeout=120))
    assert json.loads(r.prediction)["type"] == "GrpcNotServed"
    # the same model over HTTP, anonymous: served (DPreds) under the HTTP rules
    assert _post(ts, "anon", served["digits"][0]).status_code == 200


def test_a_client_refused_over_http_gets_nothing_over_grpc(served, grpc_client):
    stub, pb2 = grpc_client
    ts = served["ts"]
    _refuse(ts, "hdr", {"X-Client-Id": "hdr-refused-2"}, served["fakes"])
    body = _grpc_answer(stub, pb2, "hdr", served["digits"][0], {"X-Client-Id": b"hdr-refused-2"},
                        [("x-client-id", "hdr-refused-2")])
    assert body["type"] == "GrpcNotServed"
    body = _grpc_answer(stub, pb2, "anon", served["digits"][0], metadata=[("x-client-id", "hdr-refused-2")])
    assert body["type"] == "GrpcNotServed"


def test_http_without_client_headers_gets_the_http_rules(served):
    """An HTTP/1.0 request with no header of its own still carries the headers TorchServe's frontend
    adds (explain, url_path, content-length): it is HTTP, not a way around the gRPC decision: 401 where
    identity is required, anonymous where allowed."""
    ts, digit = served["ts"], served["digits"][0]

    def raw(model, head: bytes, body=b""):
        s = socket.create_connection(("127.0.0.1", ts.inference_port), timeout=120)
        try:
            s.sendall(b"POST /predictions/" + model.encode() + b" HTTP/1.0\r\n" + head + b"\r\n" + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and len(data.split(b"\r\n\r\n", 1)[1]) >= int(
                        data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
                    break
        finally:
            s.close()
        status = int(data.split(b" ", 2)[1])
        return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"null")

    status, body = raw("hdr", b"")
    assert status == 401 and body["type"] == "MissingIdentity", body
    status, body = raw("hdr", b"Content-Length: %d\r\n" % len(digit), digit)
    assert status == 401 and body["type"] == "MissingIdentity", body
    status, body = raw("anon", b"Content-Length: %d\r\n" % len(digit), digit)
    assert status == 200 and len(body) == 10, body


# last: TorchServe's frontend reconnects a worker after this call
def test_grpc_stream_with_sequence_headers_is_not_answered(served, grpc_client):
    """StreamPredictions2 is the one gRPC call to which TorchServe adds headers (its sequence headers):
    still no answer. On a model without sequence batching TorchServe 0.12's frontend fails the call
    itself (a NullPointerException in InferenceImpl, then the worker is reconnected), guarded or not;
    last in the module for that reason."""
    import grpc

    stub, pb2 = grpc_client
    try:
        rs = list(stub.StreamPredictions2(iter([pb2.PredictionsRequest(
            model_name="anon", input={"data": served["digits"][0]}, sequence_id="seq-1")]), timeout=120))
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.OK
        return
    assert rs and all(json.loads(r.prediction)["type"] == "GrpcNotServed" for r in rs), rs
