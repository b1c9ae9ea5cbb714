"""The guarded request path inside a TorchServe worker, shared by both handler classes.

:class:`HandlerGuard` drives an *inner* handler's own ``preprocess``, ``inference`` and ``postprocess``
(TorchServe's template methods, see ``BaseHandler.handle``) and puts the Guardian between inference
and postprocess::

    per request: Guardian.admit_batch(headers)       -> 401/400 identity, 403 refused, 429 quota used up
                                                        (+ Retry-After), 503 store down
                 image larger than max_image_pixels?  -> 400, not decoded
    live rows:   inner.preprocess (a failing batch is retried row by row: bad rows -> 400); a row
                 with NaN/inf values, or larger than max_input_ratio x the model's probed input -> 400
                 inner.inference (a failing batch is retried row by row: a failing row -> 400)
                 Guardian.inspect(preprocessed, probabilities, admissions, record=False)
                 deceived rows' outputs replaced so that the inner postprocess yields DPreds(p) (flagged,
                 anonymous) or the top-1 label only (probation), in the unprotected ranking; for a
                 label-only archive with response.label_only: topk, flagged rows yield a label drawn from
                 the top k (label_only_response, probed at load)
                 inner.postprocess
    the batch:   error bodies and metrics, then Guardian.commit: the ledger counts the answered rows and
                 commits the batch's quota holds, the last step before the answers are returned (store
                 down -> 503)

Every denial is answered with its own status and the JSON body ``{"code", "type", "message"}``
(guardian_plugin.responses.Denial), the same as the BentoML adapter's; one bad row never changes the
status or the answer of another row in the batch.

What the inner inference returns decides how a flagged row is rewritten (setting ``output``):

- ``logits`` (TorchServe's ImageClassifier and every handler whose postprocess applies softmax): the
  probabilities are ``softmax(z)`` and a flagged row becomes ``log(DPreds(p))``; since DPreds(p) sums to
  one, ``softmax(log q) = q``, so the original postprocess outputs DPreds(p) with the same top-k order.
- ``probabilities`` (inference already applies softmax; postprocess only ranks and labels): the row is
  replaced by DPreds(p) itself.
- ``auto`` (default): per batch, ``probabilities`` when every row is non-negative and sums to 1
  (within 1e-3), ``logits`` otherwise. A softmax output always passes that test and a logit vector
  practically never does, so the choice follows what the handler actually returns.

Rows the guard did not flag are handed to the postprocess bit for bit as inference returned them, so
benign clients get exactly the unprotected handler's answer.

Observe mode (guard config ``mode: observe``, docs/rollout.md): the same path decides everything, and no
row is rewritten, refused or limited (only the 400s of inputs the model cannot answer remain); what would
have happened goes to the ledger and to the GuardianWould* counters (:func:`would_counts`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from http import HTTPStatus
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from guardian_plugin.errors import LedgerUnavailable
from guardian_plugin.guardian import Guardian
from guardian_plugin.inputs import DEFAULT_MAX_PIXELS, InputError, decode_error, image_size
from guardian_plugin.request_headers import has_client_headers, real_headers
from guardian_plugin.responses import UNAVAILABLE, Admission, Denial, LabelOnlyResponse

log = logging.getLogger("guardian_plugin.handlers")

PROB_TOLERANCE = 1e-3
GAUGE_INTERVAL_S = 1.0  # GuardianGuardTime: at most one line per worker per second (HandlerGuard._metrics)


GRPC_NOT_SERVED = "GrpcNotServed"


def no_headers_denial(names: str) -> Denial:
    """The answer to a request that reaches the worker without any real header: a gRPC call. TorchServe
    0.12 passes no gRPC metadata to the worker (its grpcimpl.InferenceImpl turns the input map into
    parameters and adds no header), so a gRPC client cannot be identified, refused or counted, and every
    gRPC prediction of a guarded archive gets this (inside gRPC status OK: the frontend does not pass one
    request's status to gRPC). An HTTP request always has headers: the frontend adds ``explain`` and
    ``url_path`` to every prediction request, and Netty ``content-length``, even when the client sent
    none, so it gets the HTTP identity rules (401, or anonymous)."""
    return Denial(400, GRPC_NOT_SERVED,
                  "this guarded model answers HTTP requests only: this request reached it without any header, as "
                  "every gRPC call does (TorchServe does not pass gRPC metadata to the model), so its client cannot "
                  "be identified; send it to the HTTP inference API (POST /predictions/<model>) with the header "
                  f"{names}")


# ---------------------------------------------------------------------------------- input checks
def _payload(row):
    if isinstance(row, dict):
        return row.get("data") if row.get("data") is not None else row.get("body")
    return row


def _image_bytes(payload, strict: bool = False) -> Optional[bytes]:
    """The image bytes a vision handler would decode (text is base64, decoded leniently the way
    VisionHandler does, or strictly), or None when the payload is neither bytes nor decodable text."""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        try:
            return base64.b64decode("".join(payload.split()) if strict else payload, validate=strict)
        except (binascii.Error, ValueError):
            return None
    return None


def precheck(row, max_pixels: int) -> None:
    """Reject, before any decoding, an empty request and an image with too many pixels."""
    payload = _payload(row)
    if payload is None or (isinstance(payload, (bytes, bytearray, str, list, dict)) and len(payload) == 0):
        raise InputError(400, "EmptyInput", "the request carries no input: send an image in the body")
    raw = _image_bytes(payload)
    if raw is not None:
        image_size(raw, max_pixels)


def diagnose(row, exc: BaseException) -> InputError:
    """A clear 400 for a row the handler's own preprocess could not turn into a tensor."""
    payload = _payload(row)
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(payload, str) and _image_bytes(payload, strict=True) is None:
        return InputError(400, "BadBase64", f"the body is text but not valid base64 ({detail})")
    raw = _image_bytes(payload)
    err = decode_error(raw, exc) if raw is not None else None
    return err or InputError(400, "BadInput", f"the input could not be preprocessed ({detail})")


# ------------------------------------------------------------------------------------ output kind
def looks_like_probabilities(out: torch.Tensor) -> bool:
    o = out.detach().float()
    return bool((o >= 0).all()) and bool(((o.sum(1) - 1.0).abs() <= PROB_TOLERANCE).all())


def output_kind(out: torch.Tensor, setting: str) -> str:
    if setting != "auto":
        return setting
    return "probabilities" if looks_like_probabilities(out) else "logits"


def to_probabilities(out: torch.Tensor, kind: str) -> torch.Tensor:
    o = out.detach().float()
    return o if kind == "probabilities" else torch.softmax(o, 1)


def _keep_order(v: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, floor: float) -> torch.Tensor:
    """``v`` (float64 rows) made strictly decreasing in the order of ``p`` (the unprotected probabilities)
    by gaps of 3 ulps of ``dtype``, so that after rounding to ``dtype`` (and, for logits, the
    postprocess's monotone softmax) the classes keep exactly the unprotected ranking.

    DPreds keeps the ranking in exact arithmetic, but it adds the same ``d`` to every probability: in
    float32, tail probabilities a few 1e-9 apart become equal and a top-k could list them in another
    order. Only such near-ties move, each by a few ulps (at most about 1e-6 in all)."""
    # the very order a top-k postprocess gives the unprotected probabilities, exact ties included
    order = torch.topk(p, p.shape[1], dim=1).indices
    vs = torch.gather(v, 1, order)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    for r in range(vs.shape[1] - 2, -1, -1):
        below = vs[:, r + 1]
        scale = below.abs().clamp_min(floor) if floor > 0 else below.abs()
        vs[:, r] = torch.maximum(vs[:, r], below + 3 * eps * scale)
    return torch.empty_like(v).scatter_(1, order, vs)


def rewrite_flagged(out: torch.Tensor, probs: torch.Tensor, new_probs: torch.Tensor, flagged: torch.Tensor,
                    kind: str, free: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` with flagged rows replaced so the original postprocess yields ``new_probs`` there, in the
    unprotected ranking (``probs``); unflagged rows are left bit for bit. Rows of ``free`` (among the
    flagged) keep ``new_probs``' own ranking instead: a label-only answer drawn from the top k
    (responses.LabelOnlyResponse) must stay that label, not be put back behind the unprotected top-1.

    A one-hot row (probation's label-only answer) comes out as that one-hot: for ``probabilities`` the
    row itself, for ``logits`` 0 for the label and log(1e-300) for the others, which a float32 softmax
    turns back into exactly 1 and 0."""
    if not bool(flagged.any()):
        return out
    q = new_probs[flagged].to(torch.float64)
    p = probs[flagged]
    keep = torch.ones(q.shape[0], dtype=torch.bool) if free is None else ~free[flagged].cpu()
    if kind == "probabilities":
        rows = q.clone()
        floor = 0.0
    else:  # softmax(log q) = q for q summing to one
        rows = q.clamp_min(1e-300).log()
        floor = 1.0
    if bool(keep.any()):
        rows[keep] = _keep_order(rows[keep], p[keep], out.dtype, floor)
    res = out.clone()  # a normal tensor even when ``out`` is an inference tensor
    res[flagged.to(res.device)] = rows.to(dtype=res.dtype, device=res.device)
    return res


# ------------------------------------------------------------------------------ label-only answers
def _is_label(v) -> bool:
    """A plain label: an int (numpy's too) or a string, not a mapping or a list of scores."""
    import numbers

    return isinstance(v, (str, bytes, numbers.Integral))


def probe_label_answers(inner, num_classes: int) -> Optional[list]:
    """What the inner handler's postprocess makes of a synthetic batch of two rows of ``num_classes``
    probabilities (valid as logits too) with different top classes: the two answers when both are plain
    labels (ints or strings: the archive answers labels only, so DPreds changes nothing its clients see),
    else None (scores, or a postprocess that fails on the probe)."""
    k = max(2, int(num_classes))
    z = torch.arange(k, dtype=torch.float32)
    batch = torch.softmax(torch.stack([z, z.flip(0)]), 1)
    try:
        post = inner.postprocess(batch)
    except Exception as e:  # noqa: BLE001 - a postprocess that needs more than a tensor: not a probe we can make
        log.info("guardian: could not probe the handler's postprocess (%s: %s)", type(e).__name__, e)
        return None
    if isinstance(post, list) and len(post) == 2 and all(_is_label(v) for v in post):
        return post
    return None


# ------------------------------------------------------------------------------------------ guard
class HandlerGuard:
    """Runs a TorchServe handler's template methods with the Guardian in between; every request gets
    its own answer: one bad row never changes another row's status or answer."""

    def __init__(self, inner, guardian: Guardian, output: str = "auto", max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 max_input_elements: Optional[int] = None, model_input: str = "",
                 label_response: Optional[LabelOnlyResponse] = None):
        self.inner = inner
        self.guardian = guardian
        self.output = output
        self.max_image_pixels = max_image_pixels
        self.max_input_elements = max_input_elements  # per row; None: unbounded
        self.model_input = model_input  # e.g. "1x28x28", for the message
        # set when the inner postprocess answers labels only (probed at load): what flagged rows get
        self.label_response = label_response
        self._kind_logged = None
        self._metrics_emitted = False
        self._gauge_at = 0.0

    # -- helpers
    def _headers(self, context, i: int) -> dict:
        """Request ``i``'s real headers as TorchServe passed them, the client's casing kept. The worker's
        map also holds the request's multipart part names and gRPC input keys, with dict values
        ({"content-type": ...}): those are body content the client chose, never headers, and are left
        out (a part named X-Client-Id must not set the identity)."""
        try:
            raw = context.get_all_request_header(i) or {}
        except (IndexError, AttributeError, TypeError):
            return {}
        return dict(real_headers(raw))

    def _admit(self, headers: List[dict]) -> list:
        """Guardian.admit_batch for the requests that came with headers; one without any header (a gRPC
        call) is refused: its client cannot be identified (no_headers_denial)."""
        grpc = Admission(denial=no_headers_denial(self.guardian.identity.names()))
        admissions: List[Optional[Admission]] = [None if has_client_headers(h) else grpc for h in headers]
        rows = [i for i, a in enumerate(admissions) if a is None]
        for i, a in zip(rows, self.guardian.admit_batch([headers[i] for i in rows]) if rows else []):
            admissions[i] = a
        return admissions

    def _check_row(self, x: torch.Tensor) -> Optional[InputError]:
        if self.max_input_elements is not None and x.numel() > self.max_input_elements:
            return InputError(400, "InputTooLarge", f"the model takes {self.model_input} inputs; this request "
                                                      f"gives {'x'.join(map(str, x.shape))}")
        # the sum of finite values is finite (barring overflow past ~3e38): one reduction instead of a
        # boolean copy of the input; the exact test only when the sum is not finite
        if x.is_floating_point() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            return InputError(400, "NonFiniteInput", "the input contains NaN or infinite values")
        d = self.guardian.check_inputs(x[None])[0]  # the model answers only what the detector scores
        return InputError(d.status, d.kind, d.message) if d is not None else None

    def _preprocess(self, rows: List[int], data) -> Tuple[List[Tuple[List[int], torch.Tensor]], Dict[int, InputError]]:
        """Groups (row indices, preprocessed batch) of same-shaped valid rows, and per-row errors."""
        errors: Dict[int, InputError] = {}
        x = None
        try:
            x = self.inner.preprocess([data[i] for i in rows])
        except Exception:  # noqa: BLE001 - some row is bad: find which, row by row
            pass
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == len(rows):
            items = [(i, x[j:j + 1]) for j, i in enumerate(rows)]
        else:
            items = []
            for i in rows:
                try:
                    xi = self.inner.preprocess([data[i]])
                except Exception as e:  # noqa: BLE001 - any failure of the handler's own decoding is a bad input
                    errors[i] = diagnose(data[i], e)
                    continue
                if not isinstance(xi, torch.Tensor) or xi.dim() == 0 or xi.shape[0] != 1:
                    errors[i] = InputError(400, "BadInput", "the input could not be turned into one model input")
                    continue
                items.append((i, xi))
        by_shape: Dict[tuple, List[Tuple[int, torch.Tensor]]] = {}
        for i, xi in items:
            err = self._check_row(xi[0])
            if err is not None:
                errors[i] = err
            else:
                by_shape.setdefault(tuple(xi.shape[1:]), []).append((i, xi))
        groups = [([i for i, _ in its], torch.cat([t for _, t in its])) for its in by_shape.values()]
        return groups, errors

    def _infer(self, idx: List[int], x: torch.Tensor, errors: Dict[int, Denial]):
        """(indices, inputs, outputs) groups; a failing batch is retried row by row, and a row that still
        fails (or gives no (1, classes) output) is a 400 for that row alone."""
        out = self._try_infer(x, len(idx))
        if out is not None:
            return [(idx, x, out)]
        groups = []
        for j, i in enumerate(idx):
            o = self._try_infer(x[j:j + 1], 1) if len(idx) > 1 else None
            if o is None:
                errors[i] = Denial.bad_input("BadInput", "the model could not process this input")
            else:
                groups.append(([i], x[j:j + 1], o))
        return groups

    def _try_infer(self, x: torch.Tensor, n: int) -> Optional[torch.Tensor]:
        try:
            out = self.inner.inference(x)
        except Exception as e:  # noqa: BLE001
            log.info("guardian: inference failed on %d row(s): %s: %s", n, type(e).__name__, e)
            return None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
            raise TypeError("the guarded handler's inference must return a (batch, classes) tensor, "
                            f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        if not bool(torch.isfinite(out).all()):
            return None
        return out

    # -- the request path
    def handle(self, data: Sequence, context) -> list:
        t_start = time.perf_counter()
        n = len(data)
        responses: List[object] = [None] * n
        errors: Dict[int, Denial] = {}
        admissions = self._admit([self._headers(context, i) for i in range(n)])
        for i, a in enumerate(admissions):
            if not a.ok:
                errors[i] = a.denial
            else:
                try:
                    precheck(data[i], self.max_image_pixels)
                except InputError as e:
                    errors[i] = e.denial
        live = [i for i in range(n) if i not in errors]

        queries = flagged_n = 0
        guard_ms = 0.0
        answered: List[Tuple[List[int], object]] = []  # (rows, inspect result) answered by the model
        if live:
            groups, pre_errors = self._preprocess(live, data)
            errors.update({i: e.denial for i, e in pre_errors.items()})
            for idx, x in groups:
                for gidx, gx, out in self._infer(idx, x, errors):
                    kind = output_kind(out, self.output)
                    if kind != self._kind_logged:
                        log.info("guardian: the handler's inference returns %s", kind)
                        self._kind_logged = kind
                    probs = to_probabilities(out, kind)
                    try:  # the ledger is written by the commit below, once the answers are built
                        res = self.guardian.inspect(gx, probs, [admissions[i] for i in gidx], record=False)
                    except LedgerUnavailable:
                        errors.update({i: UNAVAILABLE for i in gidx})
                        continue
                    deceived = torch.tensor(res.deceived, dtype=torch.bool)
                    new_probs, free = res.probs, None
                    if self.label_response is not None and not self.guardian.observe:  # a label-only archive
                        free = torch.tensor(res.flagged, dtype=torch.bool)
                        labels = self.label_response(probs, free)
                        if labels is None:
                            free = None
                        else:
                            new_probs = res.probs.clone()
                            new_probs[free] = labels[free].to(new_probs.dtype)
                    post = self.inner.postprocess(rewrite_flagged(out, probs, new_probs, deceived, kind, free))
                    if not isinstance(post, list) or len(post) != len(gidx):
                        raise TypeError("the guarded handler's postprocess must return one entry per request")
                    for i, p, d in zip(gidx, post, res.cut):
                        if d is None:
                            responses[i] = p
                        else:  # the client crossed the rule at an earlier row of this batch: not answered
                            errors[i] = d
                    answered.append((gidx, res))
        sent = []  # the rows answered 200
        for gidx, res in answered:
            sent += [i for i, d in zip(gidx, res.cut) if d is None]
            queries += sum(d is None for d in res.cut)
            flagged_n += sum(f for f, d in zip(res.flagged, res.cut) if d is None)
            guard_ms += res.guard_ms
        self._answer_errors(context, responses, errors)
        statuses = [d.status for d in errors.values()]
        # the metric lines first: each crosses the worker's stdout, milliseconds of a batch on a busy host
        self._metrics(context, queries, flagged_n, statuses.count(403), statuses.count(400), guard_ms,
                      (time.perf_counter() - t_start) * 1000.0, statuses.count(429),
                      would_counts([res for _, res in answered]) if self.guardian.observe else None)
        # then the ledger update, the last step before the answers go back: a worker that dies before it
        # leaves no count (its quota holds lapse after their lease), one that dies after it and before
        # TorchServe has sent the answers does (docs/ledger.md)
        try:
            self.guardian.commit([res for _, res in answered], admissions)
        except LedgerUnavailable:  # the answered rows get 503 (their metrics are already out, docs/torchserve.md)
            self._answer_errors(context, responses, {i: UNAVAILABLE for i in sent})
        return responses

    @staticmethod
    def _answer_errors(context, responses: list, errors: Dict[int, Denial]) -> None:
        for i, d in errors.items():
            responses[i] = json.dumps(d.body())
            context.set_response_status(d.status, HTTPStatus(d.status).phrase, idx=i)
            context.set_response_content_type(i, "application/json")
            for k, v in d.headers().items():
                context.set_response_header(i, k, v)
            if d.kind == GRPC_NOT_SERVED:
                # a gRPC StreamPredictions call: end its stream with this answer (without the header the
                # frontend's GRPCJob throws a NullPointerException and restarts the worker)
                context.set_response_header(i, "ts_stream_next", "false")

    def _metrics(self, context, queries, flagged, refused, bad, guard_ms, handler_ms, quota=0, would=None):
        """TorchServe custom metrics for one batch. Every metric line crosses the worker's stdout and is
        parsed and logged by the frontend, a cost per batch (benchmarks/torchserve_overhead.py), so: every
        counter is emitted on the worker's first batch (registered and exported from the start), then
        only when non-zero; the GuardianGuardTime gauge (a scrape sees only its latest value) at most
        once per GAUGE_INTERVAL_S. ``would``: observe mode's would-be counts (:func:`would_counts`), as
        GuardianWould* counters."""
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        first, self._metrics_emitted = not self._metrics_emitted, True
        try:
            for name, v in (("GuardianQueries", queries), ("GuardianFlagged", flagged), ("GuardianRefused", refused),
                            ("GuardianQuotaExceeded", quota), ("GuardianBadInput", bad)):
                if v or first:
                    metrics.add_counter(name, v)
            for name, v in (would or {}).items():
                if v or first:
                    metrics.add_counter(name, v)
            now = time.monotonic()
            if queries and (first or now - self._gauge_at >= GAUGE_INTERVAL_S):
                self._gauge_at = now
                metrics.add_time("GuardianGuardTime", round(guard_ms, 3))
            metrics.add_time("HandlerTime", round(handler_ms, 2))
        except Exception as e:  # metrics never break a request
            log.debug("guardian: metrics failed: %s", e)


WOULD_METRICS = ("GuardianWouldRefuse", "GuardianWouldQuotaExceeded", "GuardianWouldDeny", "GuardianWouldDPreds",
                 "GuardianWouldProbation")


def would_counts(results) -> Dict[str, int]:
    """Observe mode's answered rows by what enforce mode would have done with them: 403 (refused or
    blocked), 429 (a quota), another denial (401/400 identity, 503 store down), DPreds, the probation
    response. Names as TorchServe metrics (WOULD_METRICS)."""
    n = dict.fromkeys(WOULD_METRICS, 0)
    for res in results:
        for w in res.would:
            if w is not None:
                n["GuardianWouldRefuse" if w.status == 403 else "GuardianWouldQuotaExceeded" if w.status == 429
                  else "GuardianWouldDeny"] += 1
        n["GuardianWouldDPreds"] += sum(d and not p for d, p in zip(res.would_deceived, res.would_probation))
        n["GuardianWouldProbation"] += sum(res.would_probation)
    return n


def build_guard(inner, context, model_yaml_config=None) -> HandlerGuard:
    """A HandlerGuard from the archive's ``handler: guardian:`` settings."""
    from guardian_plugin.handlers.settings import read_settings

    props = context.system_properties
    cfg_yaml = model_yaml_config if model_yaml_config is not None else getattr(context, "model_yaml_config", None)
    settings, cfg = read_settings(cfg_yaml, props.get("model_dir") or ".")
    guardian = Guardian.from_config(cfg)
    device = getattr(inner, "device", None)
    if device is not None and str(cfg.device) == "cpu" and str(device) != "cpu":
        log.info("guardian: detector on %s, model on %s", cfg.device, device)
    log.info("guardian: detector %s, ledger %s (namespace %s), rule tau=%d rho=%.2f", cfg.detector, cfg.ledger,
             cfg.namespace, guardian.ledger.rule.tau, guardian.ledger.rule.rho)
    if guardian.observe:
        log.warning("guardian: mode: observe: every request gets the unprotected model's answer; what enforce "
                    "mode would do is in the ledger and the GuardianWould* metrics (docs/rollout.md)")
    from guardian_plugin.fit import verify_handler_fit  # the detector fits the model, or the worker fails to load
    model = verify_handler_fit(inner, guardian.detector, cfg)
    if model is not None:  # the probe's input size: does the distribution reference describe this path?
        guardian.served_path(model.height, model.width)
    limit, shape = None, ""
    if model is not None and settings.max_input_ratio > 0:
        limit = int(settings.max_input_ratio * model.channels * model.height * model.width)
        shape = f"{model.channels}x{model.height}x{model.width}"
    return HandlerGuard(inner, guardian, settings.output, settings.max_image_pixels or cfg.max_image_pixels,
                        limit, shape, label_only_response(inner, guardian, cfg, model))


def label_only_response(inner, guardian: Guardian, cfg, model=None) -> Optional[LabelOnlyResponse]:
    """Probe the inner postprocess (probe_label_answers); for a label-only archive log one WARNING (what
    the guard does there) and return the configured response for its flagged rows, else None."""
    k = guardian.detector.spec.num_classes or (model.num_classes if model is not None else None) or 10
    answers = probe_label_answers(inner, k)
    if answers is None:
        if cfg.response.label_only != "top1":
            log.info("guardian: response.label_only applies to handlers that answer labels only; this one "
                     "answers scores, so flagged rows get %s", cfg.response.policy)
        return None
    response = label_response(cfg, k)
    log.warning("guardian: %s", label_only_message(answers, response))
    return response


def label_response(cfg, num_classes: int) -> LabelOnlyResponse:
    """The guard config's response for a label-only archive's flagged rows; ConfigError when
    ``response.k`` is above the model's class count."""
    if cfg.response.k > num_classes:
        from guardian_plugin.errors import ConfigError

        raise ConfigError(f"response.k is {cfg.response.k} but the model has {num_classes} classes")
    return LabelOnlyResponse(cfg.response.label_only, cfg.response.k)


def label_only_message(answers, response: LabelOnlyResponse) -> str:
    """What the worker logs at load (and `guardian protect` prints) for a label-only archive."""
    return (f"the guarded handler's postprocess answers labels only (a probe of two score rows gave {answers!r}), "
            f"so Deceptive Predictions change nothing its clients see; {response.describe()}. Identity, "
            "refusal, quotas and probation apply as usual.")
