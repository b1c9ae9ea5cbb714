"""BentoML adapter: protect a BentoML (>= 1.4, new-style) service with one decorator.

    import bentoml
    from guardian_plugin.bento import guard

    @bentoml.service(workers=2)
    @guard("guard.yaml")                       # under @bentoml.service
    class MNIST:
        def preprocess(self, image) -> torch.Tensor:     # what the model sees, (B, C, H, W) or (C, H, W)
            ...
        @bentoml.api
        def classify(self, image: PIL.Image.Image) -> list[float]:   # returns class probabilities
            return self.model(self.preprocess(image)).softmax(1)[0].tolist()

The contract
------------
* A guarded API method takes the image input and returns CLASS PROBABILITIES: a torch tensor, a numpy
  array or a (nested) list of floats, shaped (K,) for one image or (B, K) for a batch.
* ``preprocess`` (a method name or a callable ``f(service, value)``) gets exactly the value the API's
  input parameter received and returns the tensor the model consumed (victim-normalised, (B, C, H, W)
  or (C, H, W)); the detector maps it back to pixels with the artifact's input mapping.
* The answer keeps the API's own type. Rows the detector does not flag are returned untouched (the
  very object the method returned); flagged rows get Deceptive Predictions (same ranking, same top-1).
* Sync methods stay sync, async stay async (the guard's own work then runs in a worker thread), and
  ``@bentoml.api(batchable=True)`` methods keep BentoML's adaptive batching: each request's rows carry
  that request's client id through the batch.

What runs where
---------------
* ``GuardianMiddleware`` (an ASGI middleware the decorator installs on the Service) sees every request
  first: it takes the client id from the headers (guardian_plugin.identity), answers 401 when an
  identity is required and missing, and 403 with a JSON reason for a refused client -- before the body
  is read and before the API method runs. It leaves the client id in the request state.
* The wrapped API method runs the original method, then ``Guardian.inspect`` on the preprocessed
  batch (gradient representation, detector, one atomic ledger update per client, DPreds).
* The SQLite ledger (the config's default) is one file shared by all workers of the service; any ledger
  URI of guardian_plugin.ledger works. Each worker process builds its own Guardian at startup.
* Prometheus counters (``guardian_*``, via prometheus_client, multiprocess-safe) appear on BentoML's
  ``/metrics``.

How the decorator reaches the Service: a decorator under ``@bentoml.service`` runs before the Service
exists, and BentoML 1.4 offers no class-level hook for middleware. So importing this module adds one
step after ``Service.__attrs_post_init__``: a Service whose class carries a guard gets the middleware
(``install_service_hook``). The function form :func:`protect` needs no hook. Should the middleware be
missing anyway, the wrapped methods still check identity and refusal themselves (after body parsing).
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import logging
import os
import sys
import threading
import time
import typing as t
from dataclasses import dataclass, field

import torch

from guardian_plugin.config import GuardConfig, load_config, parse_config
from guardian_plugin.identity import MissingIdentity, client_id

log = logging.getLogger("guardian_plugin.bento")

GUARD_ATTR = "__guardian_guard__"
CONFIG_ENV = "GUARDIAN_CONFIG"  # a guard YAML that replaces the decorator's config (ops / tests)
LEDGER_ENV = "GUARDIAN_LEDGER"  # a ledger URI that replaces the config's (e.g. one file for a deployment)
STATE_CLIENT = "guardian_client_id"
STATE_CHECKED = "guardian_checked"

__all__ = ["guard", "protect", "GuardianMiddleware", "GuardSettings", "install_service_hook", "Tagged", "BentoTarget"]


# ------------------------------------------------------------------------------------ settings
@dataclass
class GuardSettings:
    """What ``guard(...)`` was told; shared by the wrapped methods and the middleware of one class."""

    config: t.Any = None  # path | dict | GuardConfig | None (then ``guardian`` is required)
    guardian: t.Any = None  # a Guardian, or a zero-argument factory called once per process
    preprocess: t.Any = "preprocess"
    apis: t.Optional[t.Tuple[str, ...]] = None
    base_dir: t.Optional[str] = None  # relative config paths are taken from here (the class's module)
    service_name: str = ""
    api_names: t.List[str] = field(default_factory=list)
    _runtime: t.Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def runtime(self) -> "_Runtime":
        rt = self._runtime
        if rt is None or rt.pid != os.getpid():
            with self._lock:
                if self._runtime is None or self._runtime.pid != os.getpid():
                    self._runtime = _Runtime(self)
                rt = self._runtime
        return rt

    def resolve_config(self) -> t.Optional[GuardConfig]:
        cfg = self._config()
        if cfg is not None and os.environ.get(LEDGER_ENV):
            cfg = cfg.model_copy(update={"ledger": os.environ[LEDGER_ENV]})
        return cfg

    def _config(self) -> t.Optional[GuardConfig]:
        env = os.environ.get(CONFIG_ENV)
        if env:
            return load_config(env)
        cfg = self.config
        if cfg is None:
            return None
        if isinstance(cfg, GuardConfig):
            return cfg
        if isinstance(cfg, dict):
            return parse_config(cfg, "<guard config>", base_dir=self.base_dir)
        path = os.fspath(cfg)
        if not os.path.isabs(path) and self.base_dir and not os.path.exists(path):
            cand = os.path.join(self.base_dir, path)
            if os.path.exists(cand):
                path = cand
        return load_config(path)


# ------------------------------------------------------------------------------------- metrics
_METRICS: dict = {}
_METRICS_LOCK = threading.Lock()


def _metric(kind: str, name: str, doc: str, labels: t.Sequence[str], **kw):
    """prometheus_client metrics, created once per process on first use: BentoML sets
    PROMETHEUS_MULTIPROC_DIR in each worker before the service starts, and prometheus_client must be
    imported after that to write the multiprocess files /metrics aggregates."""
    with _METRICS_LOCK:
        m = _METRICS.get(name)
        if m is None:
            import prometheus_client

            m = getattr(prometheus_client, kind)(name, doc, list(labels), **kw)
            _METRICS[name] = m
        return m


class _Metrics:
    def __init__(self, service: str):
        self.service = service
        lab = ["service", "api"]
        self.queries = _metric("Counter", "guardian_queries", "Images inspected by Model-Guardian", lab)
        self.flagged = _metric("Counter", "guardian_flagged", "Images flagged as synthetic (answered with DPreds)", lab)
        self.crossed = _metric("Counter", "guardian_clients_refused",
                               "Clients that crossed the refusal rule in this service", ["service"])
        self.refused = _metric("Counter", "guardian_refused_requests",
                               "Requests answered 403 because the client is refused", ["service"])
        self.missing = _metric("Counter", "guardian_missing_identity_requests",
                               "Requests answered 401 for lack of a client identity", ["service"])
        self.guard_s = _metric("Histogram", "guardian_guard_seconds",
                               "Time the guard adds per batch (gradient, detector, ledger, response)", lab,
                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def inspected(self, api: str, n: int, n_flagged: int, newly_refused: int, seconds: float):
        self.queries.labels(self.service, api).inc(n)
        if n_flagged:
            self.flagged.labels(self.service, api).inc(n_flagged)
        if newly_refused:
            self.crossed.labels(self.service).inc(newly_refused)
        self.guard_s.labels(self.service, api).observe(seconds)


# ------------------------------------------------------------------------------------- runtime
class _Runtime:
    """Per-process state: the Guardian (detector + ledger), the identity rules, the metrics."""

    def __init__(self, settings: GuardSettings):
        from guardian_plugin.config import IdentityConfig
        from guardian_plugin.guardian import Guardian

        self.pid = os.getpid()
        cfg = settings.resolve_config()
        g = settings.guardian
        if g is not None and os.environ.get(CONFIG_ENV) is None:
            self.guardian = g() if callable(g) and not isinstance(g, Guardian) else g
        elif cfg is not None:
            self.guardian = Guardian.from_config(cfg)
        else:
            raise ValueError("guard(...) needs a config (path, dict or GuardConfig) or a guardian")
        self.identity = cfg.identity if cfg is not None else IdentityConfig()
        self.metrics = _Metrics(settings.service_name or "unknown")
        self._lock = threading.Lock()  # the detector's autograd pass is not shared across threads
        log.info("guardian: service %s protected (pid %d, ledger %s)", settings.service_name, self.pid,
                 type(self.guardian.ledger).__name__)

    # identity and refusal, for one request ------------------------------------------------------
    def check_request(self, request) -> t.Tuple[t.Optional[str], t.Optional[t.Tuple[int, dict]]]:
        """(client id, None) or (client id or None, (status, JSON body)) for a request to refuse."""
        state = request.scope.setdefault("state", {})
        if state.get(STATE_CHECKED):
            return state.get(STATE_CLIENT), None
        try:
            cid = client_id(request.headers, self.identity)
        except MissingIdentity as e:
            self.metrics.missing.labels(self.metrics.service).inc()
            return None, (401, {"error": "missing client identity", "detail": str(e)})
        st = self.guardian.ledger.get(cid)
        if st.denied:
            self.metrics.refused.labels(self.metrics.service).inc()
            reason = ("blocked by an operator" if st.blocked else
                      "too many of this client's queries were flagged as synthetic (data-free model stealing)")
            return cid, (403, {"error": "refused", "detail": f"Model-Guardian refuses this client: {reason}",
                               "client_id": cid})
        state[STATE_CLIENT] = cid
        state[STATE_CHECKED] = True
        return cid, None

    # the guard step, for one (batched) call ------------------------------------------------------
    def guard(self, api: str, inputs, probs, client_ids: t.Sequence[str]):
        t0 = time.perf_counter()
        p, restore = _as_prob_tensor(probs)
        x = _as_input_tensor(inputs)
        if x.shape[0] != p.shape[0] or len(client_ids) != p.shape[0]:
            raise ValueError(f"guarded API {api!r}: preprocess gave {x.shape[0]} rows, the method returned "
                             f"{p.shape[0]} probability rows for {len(client_ids)} requests' rows")
        with self._lock:
            res = self.guardian.inspect(x, p, list(client_ids), refused=[False] * p.shape[0])
        rows = collections.Counter(client_ids)
        newly = sum(1 for cid, s in res.states.items()  # clients that crossed the rule in this call
                    if s.refused and s.refused_at_query is not None and s.refused_at_query > s.queries - rows[cid])
        n_flag = sum(res.flagged)
        self.metrics.inspected(api, p.shape[0], n_flag, newly, time.perf_counter() - t0)
        if n_flag == 0:
            return probs  # the very object the method returned: benign answers are untouched
        return restore(res.probs)


def _as_input_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        pass
    else:
        try:
            import numpy as np

            x = torch.from_numpy(np.asarray(x))
        except Exception as e:
            raise TypeError(f"preprocess must return a tensor or array, got {type(x).__name__}") from e
    x = x.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"preprocess must give (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x.float()


def _as_prob_tensor(probs):
    """(B, K) tensor view of an API's probabilities, and a function that turns a (B, K) tensor back
    into the API's own type and shape."""
    import numpy as np

    if isinstance(probs, torch.Tensor):
        p = probs.detach()
        one = p.dim() == 1
        p2 = p.unsqueeze(0) if one else p

        def restore(out):
            out = out.to(probs.dtype)
            return out[0] if one else out
    elif isinstance(probs, np.ndarray):
        one = probs.ndim == 1
        p2 = torch.from_numpy(np.ascontiguousarray(probs.reshape(1, -1) if one else probs))

        def restore(out):
            a = out.cpu().numpy().astype(probs.dtype, copy=False)
            return a[0] if one else a
    elif isinstance(probs, (list, tuple)):
        arr = torch.tensor(probs, dtype=torch.float64)
        one = arr.dim() == 1
        p2 = arr.unsqueeze(0) if one else arr

        def restore(out):
            lst = out.to(torch.float64).tolist()
            return lst[0] if one else lst
    else:
        raise TypeError(f"a guarded API must return class probabilities (tensor, array or list), "
                        f"got {type(probs).__name__}")
    if p2.dim() != 2:
        raise ValueError(f"probabilities must be (K,) or (B, K), got shape {tuple(p2.shape)}")
    return p2, restore


# --------------------------------------------------------------------------------- middleware
class GuardianMiddleware:
    """ASGI middleware: per-request identity, 401 for a missing one (when required), 403 with a JSON
    reason for a refused client -- before the request body is read and the API method runs."""

    def __init__(self, app, settings: GuardSettings, paths: t.Iterable[str]):
        self.app = app
        self.settings = settings
        self.paths = frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        rt = self.settings.runtime()
        _, refusal = rt.check_request(Request(scope))
        if refusal is not None:
            status, body = refusal
            return await JSONResponse(body, status_code=status)(scope, receive, send)
        return await self.app(scope, receive, send)


# ------------------------------------------------------------------------ batch row identities
class Tagged:
    """A request's batch input with one client id per row, carried through BentoML's batching."""

    __slots__ = ("value", "client_ids")

    def __init__(self, value, client_ids: t.List[str]):
        self.value = value
        self.client_ids = client_ids

    def __repr__(self):
        return f"Tagged({len(self.client_ids)} rows)"


def _register_tagged_container(batch_dim_in: int = 0):
    from bentoml._internal.runner.container import AutoContainer, DataContainer, DataContainerRegistry

    if DataContainerRegistry.CONTAINER_BATCH_TYPE_MAP.get(_lazy(Tagged)) is not None:
        return

    class TaggedContainer(DataContainer):
        @classmethod
        def batches_to_batch(cls, batches, batch_dim=0):
            value, indices = AutoContainer.batches_to_batch([b.value for b in batches], batch_dim)
            ids: t.List[str] = []
            for b in batches:
                ids.extend(b.client_ids)
            return Tagged(value, ids), indices

        @classmethod
        def batch_to_batches(cls, batch, indices, batch_dim=0):
            values = AutoContainer.batch_to_batches(batch.value, indices, batch_dim)
            return [Tagged(v, batch.client_ids[indices[i]:indices[i + 1]]) for i, v in enumerate(values)]

        @classmethod
        def get_batch_size(cls, batch, batch_dim=0):
            return len(batch.client_ids)

        @classmethod
        def to_payload(cls, batch, batch_dim=0):
            raise NotImplementedError("guarded batches stay in the API server process")

        @classmethod
        def from_payload(cls, payload):
            raise NotImplementedError("guarded batches stay in the API server process")

    DataContainerRegistry.register_container(Tagged, Tagged, TaggedContainer)


def _lazy(tp):
    from bentoml._internal.types import LazyType

    return LazyType.from_type(tp)


def _current_request():
    from bentoml._internal.context import _request_var

    return _request_var.get(None)


def _refusal_exception(status: int, body: dict):
    from bentoml.exceptions import BentoMLException
    from http import HTTPStatus

    class _Refusal(BentoMLException):
        error_code = HTTPStatus(status)

    return _Refusal(json.dumps(body))


# ------------------------------------------------------------------------------ API wrapping
def _input_param(sig: inspect.Signature, ctx_name: t.Optional[str]) -> inspect.Parameter:
    params = [p for i, p in enumerate(sig.parameters.values()) if i > 0 and p.name != ctx_name
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not params:
        raise TypeError("a guarded API needs an input parameter (the image or batch of images)")
    return params[0]


def _resolve_preprocess(settings: GuardSettings, instance, api: str):
    pre = settings.preprocess
    if isinstance(pre, dict):
        pre = pre.get(api, "preprocess")
    if isinstance(pre, str):
        fn = getattr(instance, pre, None)
        if fn is None:
            raise TypeError(f"guarded API {api!r}: the service has no method {pre!r} (the guard's preprocess)")
        return fn
    return functools.partial(pre, instance)


def _run_preprocess(settings, instance, api, value):
    from bentoml.exceptions import BadInput

    fn = _resolve_preprocess(settings, instance, api)
    try:
        return fn(value)
    except ValueError as e:  # the client's input: 400, before the method runs
        raise BadInput(f"input cannot be preprocessed: {e}") from e


def _wrap_api(method, settings: GuardSettings):
    """A new APIMethod whose function takes the guard's view of the input (preprocess), runs the
    original method, then the guard on its probabilities."""
    import bentoml
    from _bentoml_sdk.method import APIMethod

    func = method.func
    api = method.name
    sig = inspect.signature(func)
    hints = t.get_type_hints(func, include_extras=True) if hasattr(func, "__annotations__") else {}
    user_ctx = method.ctx_param
    inp = _input_param(sig, user_ctx)
    is_async = inspect.iscoroutinefunction(func)
    params = []
    for p in sig.parameters.values():
        if p.name in hints:
            p = p.replace(annotation=hints[p.name])
        params.append(p)
    ret = hints.get("return", sig.return_annotation)
    # an undecodable upload (PIL raises OSError inside BentoML's validator) is the client's error: 400
    from pydantic import WrapValidator

    params = [p.replace(annotation=t.Annotated[p.annotation, WrapValidator(_decode_errors_as_400)])
              if p.name == inp.name and p.annotation is not inspect.Parameter.empty else p for p in params]

    if method.batchable:
        # BentoML batches the values of many requests; a validator tags each request's rows with its
        # client id (in the request's own context), the Tagged container keeps ids and rows together
        from pydantic import AfterValidator

        batch_dim = method.batch_dim[0]

        def tag(value):
            from bentoml._internal.runner.container import AutoContainer

            req = _current_request()
            cid = None
            if req is not None:
                cid, refusal = settings.runtime().check_request(req)
                if refusal is not None:
                    raise _refusal_exception(*refusal)
            n = AutoContainer.get_batch_size(value, batch_dim)
            return Tagged(value, [cid or settings.runtime().identity.anonymous_id] * n)

        _register_tagged_container()
        params = [p.replace(annotation=t.Annotated[p.annotation, AfterValidator(tag)]) if p.name == inp.name else p
                  for p in params]
        new_sig = sig.replace(parameters=params, return_annotation=ret)

        def _split(args, kwargs):
            bound = new_sig.bind(*args, **kwargs)
            tagged = bound.arguments[inp.name]
            if not isinstance(tagged, Tagged):  # a local call (svc.method(batch)) bypasses validation
                tagged = Tagged(tagged, [settings.runtime().identity.anonymous_id]
                                * _batch_len(tagged, batch_dim))
            bound.arguments[inp.name] = tagged.value
            return bound, tagged

        if is_async:
            async def wrapper(self, *args, **kwargs):
                bound, tagged = _split((self, *args), kwargs)
                x = await _to_thread(_preprocessed, settings, self, api, tagged.value)
                probs = await func(*bound.args, **bound.kwargs)
                return await _to_thread(_guard_call, settings, api, x, probs, tagged.client_ids)
        else:
            def wrapper(self, *args, **kwargs):
                bound, tagged = _split((self, *args), kwargs)
                x = _preprocessed(settings, self, api, tagged.value)
                probs = func(*bound.args, **bound.kwargs)
                return _guard_call(settings, api, x, probs, tagged.client_ids)
    else:
        ctx_name = user_ctx or "ctx"
        if user_ctx is None:
            ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=bentoml.Context)
            var_kw = [p for p in params if p.kind == p.VAR_KEYWORD]
            params = [p for p in params if p.kind != p.VAR_KEYWORD] + [ctx_param] + var_kw
        new_sig = sig.replace(parameters=params, return_annotation=ret)
        user_sig = sig

        def _prepare(self, args, kwargs):
            ctx = kwargs[ctx_name] if user_ctx else kwargs.pop(ctx_name, None)
            request = _ctx_request(ctx)
            cid, refusal = None, None
            if request is not None:
                cid, refusal = settings.runtime().check_request(request)
            if refusal is not None:
                status, body = refusal
                ctx.response.status_code = status  # BentoML copies it onto a returned Response
                from starlette.responses import JSONResponse

                return None, None, JSONResponse(body, status_code=status)
            value = user_sig.bind(self, *args, **kwargs).arguments[inp.name]
            return cid or settings.runtime().identity.anonymous_id, value, None

        if is_async:
            async def wrapper(self, *args, **kwargs):
                cid, value, refused = _prepare(self, args, kwargs)
                if refused is not None:
                    return refused
                x = await _to_thread(_preprocessed, settings, self, api, value)
                probs = await func(self, *args, **kwargs)
                return await _to_thread(_guard_call, settings, api, x, probs, None, cid)
        else:
            def wrapper(self, *args, **kwargs):
                cid, value, refused = _prepare(self, args, kwargs)
                if refused is not None:
                    return refused
                x = _preprocessed(settings, self, api, value)
                probs = func(self, *args, **kwargs)
                return _guard_call(settings, api, x, probs, None, cid)

    functools.update_wrapper(wrapper, func)
    del wrapper.__wrapped__  # BentoML and inspect must see the new signature, not the original's
    wrapper.__signature__ = new_sig
    wrapper.__guardian_original__ = func
    return APIMethod(func=wrapper, route=method.route, output_spec=method.output_spec, batchable=method.batchable,
                     batch_dim=method.batch_dim, max_batch_size=method.max_batch_size,
                     max_latency_ms=method.max_latency_ms, is_task=method.is_task)


def _decode_errors_as_400(value, handler):
    try:
        return handler(value)
    except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode the input: {type(e).__name__}: {e}") from None


def _batch_len(value, batch_dim):
    from bentoml._internal.runner.container import AutoContainer

    return AutoContainer.get_batch_size(value, batch_dim)


def _ctx_request(ctx):
    if ctx is None:
        return _current_request()
    try:
        return ctx.request
    except LookupError:  # called outside a request (a local call)
        return None


async def _to_thread(fn, *args):
    import anyio.to_thread

    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


def _preprocessed(settings, instance, api, value) -> torch.Tensor:
    """The guard's view of the input, taken before the method runs: a ValueError of ``preprocess``
    (input it cannot use) is a 400; a result that is no (B, C, H, W) tensor is a bug of the service (500)."""
    return _as_input_tensor(_run_preprocess(settings, instance, api, value))


def _guard_call(settings, api, x, probs, client_ids=None, cid=None):
    ids = list(client_ids) if client_ids is not None else [cid] * x.shape[0]
    return settings.runtime().guard(api, x, probs, ids)


# --------------------------------------------------------------------------- class decorator
def _guard_class(cls: type, settings: GuardSettings) -> type:
    """A subclass of ``cls`` (same name, module and doc) whose chosen API methods are guarded; the
    user's class itself is never modified, so services built from it elsewhere stay as they were."""
    from _bentoml_sdk.method import APIMethod

    apis = {}
    for name in dir(cls):
        m = getattr(cls, name, None)
        if isinstance(m, APIMethod):
            apis[name] = m
    wanted = settings.apis if settings.apis is not None else tuple(apis)
    missing = [a for a in wanted if a not in apis]
    if missing:
        raise TypeError(f"guard(apis=...): {cls.__name__} has no @bentoml.api method {', '.join(missing)}")
    if not wanted:
        raise TypeError(f"guard: {cls.__name__} has no @bentoml.api method to protect")
    if getattr(cls, GUARD_ATTR, None) is not None:
        raise TypeError(f"guard: {cls.__name__} is already guarded")
    cls = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                      "__doc__": cls.__doc__})
    for name in wanted:
        setattr(cls, name, _wrap_api(apis[name], settings))
    settings.api_names = list(wanted)
    settings.service_name = settings.service_name or cls.__name__
    if settings.base_dir is None:
        mod = sys.modules.get(cls.__module__)
        settings.base_dir = os.path.dirname(os.path.abspath(mod.__file__)) if getattr(mod, "__file__", None) else None

    def _guardian_startup(self):
        """Build this worker's Guardian (detector + ledger) before the first request."""
        settings.runtime()

    _guardian_startup.__bentoml_startup_hook__ = True
    setattr(cls, "_guardian_startup", _guardian_startup)
    setattr(cls, GUARD_ATTR, settings)
    return cls


def guard(config=None, *, guardian=None, preprocess="preprocess", apis: t.Optional[t.Sequence[str]] = None):
    """Class decorator, under ``@bentoml.service``: guard the class's ``@bentoml.api`` methods.

    config      a guard YAML path (relative: to the current directory, else to the class's module),
                a dict, or a GuardConfig; the environment variable GUARDIAN_CONFIG overrides it.
    guardian    instead of a config: a Guardian, or a zero-argument factory (called once per worker).
    preprocess  the name of a method of the service (or a callable ``f(service, value)``, or a dict
                api name -> either) that returns the tensor the model consumed for the API's input.
    apis        the names of the API methods to guard (default: all of them).
    """
    if callable(config) and isinstance(config, type):
        raise TypeError("use @guard(config) with arguments, e.g. @guard('guard.yaml')")
    install_service_hook()

    def deco(cls):
        from _bentoml_sdk.service.factory import Service

        if isinstance(cls, Service):
            raise TypeError("guard(...) goes UNDER @bentoml.service (or use protect(Service, ...))")
        settings = GuardSettings(config=config, guardian=guardian, preprocess=preprocess,
                                 apis=tuple(apis) if apis is not None else None)
        return _guard_class(cls, settings)

    return deco


def _attach(svc, settings: GuardSettings) -> None:
    """Install the middleware on a Service whose class carries a guard (idempotent)."""
    from bentoml._internal.utils.uri import join_paths

    if any(cls is GuardianMiddleware and opts.get("settings") is settings for cls, opts in svc.middlewares):
        return
    settings.service_name = svc.name
    paths = set()
    for name in settings.api_names:
        route = join_paths(svc.path_prefix, svc.apis[name].route)
        paths.update({route, route.rstrip("/") or "/"})
    svc.add_asgi_middleware(GuardianMiddleware, settings=settings, paths=sorted(paths))


def install_service_hook() -> None:
    """After BentoML builds a Service, attach the guard's middleware when its class carries one."""
    from _bentoml_sdk.service.factory import Service

    current = Service.__attrs_post_init__
    if getattr(current, "__guardian_hook__", False):
        return

    @functools.wraps(current)
    def __attrs_post_init__(self) -> None:
        current(self)
        settings = getattr(self.inner, GUARD_ATTR, None)
        if isinstance(settings, GuardSettings):
            _attach(self, settings)

    __attrs_post_init__.__guardian_hook__ = True
    Service.__attrs_post_init__ = __attrs_post_init__


def protect(target, config=None, *, guardian=None, preprocess="preprocess", apis=None, name: t.Optional[str] = None):
    """Function form, for a service defined elsewhere.

    ``target`` a ``bentoml.Service`` (the result of ``@bentoml.service``): returns a NEW Service with the
    same settings whose class is a guarded subclass of the original's (the original stays unprotected).
    Assign it to a module-level name, e.g. ``MNISTGuarded = protect(MNIST, "guard.yaml")``.
    ``target`` a plain class: the same as ``guard(...)(target)``.
    """
    from _bentoml_sdk.service.factory import Service

    deco = guard(config, guardian=guardian, preprocess=preprocess, apis=apis)
    if not isinstance(target, Service):
        return deco(target)
    sub = deco(target.inner)
    svc = type(target)(
        name=name or target.name, config=dict(target.config), inner=sub, image=target.image,
        description=target.description, path_prefix=target.path_prefix,
        envs=[{"name": e.name, "value": e.value, "stage": e.stage} for e in target.envs],
        labels=dict(target.labels), cmd=target.cmd,
    )
    caller = sys._getframe(1).f_globals.get("__name__", "__main__")
    svc._caller_module = caller  # where `bentoml serve module:Name` will look for it
    for app, path, mname in target.mount_apps:
        if (app, path, mname) not in svc.mount_apps:
            svc.mount_apps.append((app, path, mname))
    svc.middlewares[:0] = list(target.middlewares)  # the original's own middlewares stay outside ours
    _attach(svc, getattr(sub, GUARD_ATTR))
    return svc


# ------------------------------------------------------------------------------ attack target
class _BentoTarget:
    """An attack's view of a served BentoML classifier (guardian_plugin.attacks.target.QueryTarget):
    one client (``X-Client-Id``), every image one query.

    Inputs are victim-normalised tensors; each image is mapped back to pixels with ``mean``/``std``,
    rounded to 8 bits and sent as a PNG, as a real client would. ``batch_field`` set: one multipart
    request per query batch to a batchable API taking a list of images (answer ``(B, K)``); else one
    request per image to ``field`` (answer ``(K,)``), sent concurrently. A 403 raises QueryRefused.
    """

    def __init__(self, url: str, api: str = "classify_batch", num_classes: int = 10, mean=(0.1307,), std=(0.3081,),
                 client_id: t.Optional[str] = "attacker", headers: t.Optional[dict] = None,
                 batch_field: t.Optional[str] = "images", field: str = "image", concurrency: int = 8,
                 timeout_s: float = 120.0):
        import requests

        self.endpoint = url.rstrip("/") + "/" + api.lstrip("/")
        self.num_classes = num_classes
        self.mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std)).view(1, -1, 1, 1)
        self.headers = dict(headers or {})
        if client_id is not None:
            self.headers["X-Client-Id"] = client_id
        self.batch_field, self.field = batch_field, field
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.queries = 0
        self.refused_at: t.Optional[int] = None
        self.statuses: dict = {}
        self._session = requests.Session()

    def _refused(self, n: int):
        from guardian_plugin.attacks.target import QueryRefused

        if self.refused_at is None:
            self.refused_at = self.queries
        raise QueryRefused(self.headers.get("X-Client-Id", "client"))

    def _count(self, r):
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        pix = (x.detach().cpu().float() * self.std + self.mean).clamp(0, 1)
        from guardian_plugin.torchserve.target import png_bytes

        pngs = [png_bytes(p) for p in pix]
        if self.batch_field:
            r = self._session.post(self.endpoint, headers=self.headers, timeout=self.timeout_s,
                                   files=[(self.batch_field, (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
            self._count(r)
            if r.status_code == 403:
                self._refused(len(pngs))
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += len(pngs)
            return torch.tensor(r.json(), dtype=torch.float32).view(len(pngs), self.num_classes)
        from concurrent.futures import ThreadPoolExecutor

        def post(b):
            return self._session.post(self.endpoint, headers=self.headers, timeout=self.timeout_s,
                                      files={self.field: ("x.png", b, "image/png")})

        with ThreadPoolExecutor(self.concurrency) as ex:
            resps = list(ex.map(post, pngs))
        out = []
        for r in resps:
            self._count(r)
            if r.status_code == 403:
                self._refused(1)
            if r.status_code != 200:
                raise RuntimeError(f"{self.endpoint}: HTTP {r.status_code} {r.text[:200]}")
            self.queries += 1
            out.append(torch.tensor(r.json(), dtype=torch.float32).view(self.num_classes))
        return torch.stack(out)

    def close(self):
        self._session.close()


def __getattr__(name: str):
    """``BentoTarget`` subclasses QueryTarget; built on first use so that serving never imports the
    attack package."""
    if name == "BentoTarget":
        from guardian_plugin.attacks.target import QueryTarget

        cls = type("BentoTarget", (_BentoTarget, QueryTarget), {"__module__": __name__, "__doc__": _BentoTarget.__doc__})
        globals()["BentoTarget"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
