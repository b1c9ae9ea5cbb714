"""Rewriting one ``@bentoml.api`` method into a guarded one (preprocess, the method, the guard), and
the Tagged rows that carry each request's client id through BentoML's adaptive batching."""

from __future__ import annotations

import functools
import inspect
import typing as t

import torch

from guardian_plugin.bento.conversion import _as_input_tensor
from guardian_plugin.bento.middleware import denial_exception, denial_response, input_error
from guardian_plugin.inputs import InputError, load_checked
from guardian_plugin.responses import Admission

if t.TYPE_CHECKING:
    from guardian_plugin.bento.decorator import GuardSettings


# ------------------------------------------------------------------------ batch row identities
class Tagged:
    """A request's batch input with one Admission per row (and, when checked in the request's own
    validator, the guard's preprocessed view), carried through BentoML's batching."""

    __slots__ = ("value", "admissions", "x")

    def __init__(self, value, admissions: t.List[Admission], x: t.Optional[torch.Tensor] = None):
        self.value = value
        self.admissions = admissions
        self.x = x

    def __repr__(self):
        return f"Tagged({len(self.admissions)} rows)"


def _register_tagged_container(batch_dim_in: int = 0):
    from bentoml._internal.runner.container import AutoContainer, DataContainer, DataContainerRegistry

    if DataContainerRegistry.CONTAINER_BATCH_TYPE_MAP.get(_lazy(Tagged)) is not None:
        return

    class TaggedContainer(DataContainer):
        @classmethod
        def batches_to_batch(cls, batches, batch_dim=0):
            value, indices = AutoContainer.batches_to_batch([b.value for b in batches], batch_dim)
            adm: t.List[Admission] = []
            for b in batches:
                adm.extend(b.admissions)
            xs = [b.x for b in batches]
            x = torch.cat(xs) if all(v is not None for v in xs) else None
            return Tagged(value, adm, x), indices

        @classmethod
        def batch_to_batches(cls, batch, indices, batch_dim=0):
            values = AutoContainer.batch_to_batches(batch.value, indices, batch_dim)
            return [Tagged(v, batch.admissions[indices[i]:indices[i + 1]],
                           None if batch.x is None else batch.x[indices[i]:indices[i + 1]]) for i, v in enumerate(values)]

        @classmethod
        def get_batch_size(cls, batch, batch_dim=0):
            return len(batch.admissions)

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
    except Exception as e:  # noqa: BLE001 - preprocess decodes the client's input: its failure is a 400
        raise BadInput(f"[BadInput] input cannot be preprocessed: {type(e).__name__}: {e}") from e


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

    params = [p.replace(annotation=t.Annotated[p.annotation, WrapValidator(functools.partial(_checked_input, settings))])
              if p.name == inp.name and p.annotation is not inspect.Parameter.empty else p for p in params]

    if method.batchable:
        # BentoML batches the values of many requests; a validator tags each request's rows with its
        # client id (in the request's own context), the Tagged container keeps ids and rows together
        from pydantic import AfterValidator

        batch_dim = method.batch_dim[0]

        def tag(value):
            """Per request, before batching: its admission, and its preprocessed rows (so a bad input is
            a 400 for this request alone, never a failure of the batch it would have joined)."""
            from bentoml._internal.runner.container import AutoContainer
            from bentoml.exceptions import BadInput

            rt = settings.runtime()
            req = _current_request()
            adm = rt.check_request(req) if req is not None else rt.local_admission()
            if adm.denial is not None:
                raise denial_exception(adm.denial)
            x = None
            if rt.instance is not None:
                try:
                    x = _preprocessed(settings, rt.instance, api, value)
                except BadInput as e:
                    raise ValueError(str(e)) from None
            rows = AutoContainer.get_batch_size(value, batch_dim)
            adm = rt.admit_rows(req, adm, rows)  # the quota covers every image of the request, or 429
            if adm.denial is not None:
                raise denial_exception(adm.denial)
            return Tagged(value, [adm] * rows, x)

        _register_tagged_container()
        params = [p.replace(annotation=t.Annotated[p.annotation, AfterValidator(tag)]) if p.name == inp.name else p
                  for p in params]
        new_sig = sig.replace(parameters=params, return_annotation=ret)

        def _split(args, kwargs):
            bound = new_sig.bind(*args, **kwargs)
            tagged = bound.arguments[inp.name]
            if not isinstance(tagged, Tagged):  # a local call (svc.method(batch)) bypasses validation
                tagged = Tagged(tagged, [settings.runtime().local_admission()] * _batch_len(tagged, batch_dim))
            bound.arguments[inp.name] = tagged.value
            return bound, tagged

        if is_async:
            async def wrapper(self, *args, **kwargs):
                bound, tagged = _split((self, *args), kwargs)
                x = tagged.x if tagged.x is not None else await _to_thread(_preprocessed, settings, self, api, tagged.value)
                probs = await func(*bound.args, **bound.kwargs)
                return await _to_thread(_guard_call, settings, api, x, probs, tagged.admissions)
        else:
            def wrapper(self, *args, **kwargs):
                bound, tagged = _split((self, *args), kwargs)
                x = tagged.x if tagged.x is not None else _preprocessed(settings, self, api, tagged.value)
                probs = func(*bound.args, **bound.kwargs)
                return _guard_call(settings, api, x, probs, tagged.admissions)
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
            rt = settings.runtime()
            adm = rt.check_request(request) if request is not None else rt.local_admission()
            if adm.denial is not None:
                return None, None, _deny(ctx, adm.denial)
            value = user_sig.bind(self, *args, **kwargs).arguments[inp.name]
            return (adm, ctx, request), value, None

        def _rows(call, x):
            """The admission of the request's rows: a list input reserves its other images' quota now."""
            adm, ctx, request = call
            adm = settings.runtime().admit_rows(request, adm, x.shape[0])
            return adm, (_deny(ctx, adm.denial) if adm.denial is not None else None)

        if is_async:
            async def wrapper(self, *args, **kwargs):
                call, value, refused = _prepare(self, args, kwargs)
                if refused is not None:
                    return refused
                x = await _to_thread(_preprocessed, settings, self, api, value)
                adm, refused = _rows(call, x)
                if refused is not None:
                    return refused
                probs = await func(self, *args, **kwargs)
                return await _to_thread(_guard_call, settings, api, x, probs, [adm] * x.shape[0])
        else:
            def wrapper(self, *args, **kwargs):
                call, value, refused = _prepare(self, args, kwargs)
                if refused is not None:
                    return refused
                x = _preprocessed(settings, self, api, value)
                adm, refused = _rows(call, x)
                if refused is not None:
                    return refused
                probs = func(self, *args, **kwargs)
                return _guard_call(settings, api, x, probs, [adm] * x.shape[0])

    functools.update_wrapper(wrapper, func)
    del wrapper.__wrapped__  # BentoML and inspect must see the new signature, not the original's
    wrapper.__signature__ = new_sig
    wrapper.__guardian_original__ = func
    return APIMethod(func=wrapper, route=method.route, output_spec=method.output_spec, batchable=method.batchable,
                     batch_dim=method.batch_dim, max_batch_size=method.max_batch_size,
                     max_latency_ms=method.max_latency_ms, is_task=method.is_task)


def _deny(ctx, denial):
    """The answer of a denied call: the denial's status (BentoML copies ``ctx.response.status_code`` onto a
    returned Response), JSON body and headers (Retry-After)."""
    if ctx is not None:
        ctx.response.status_code = denial.status
    return denial_response(denial)


def _checked_input(settings, value, handler):
    """The input parameter's own validation, then the guard's checks of every image in it: more pixels
    than allowed (from the header, before decoding), not an image, truncated or corrupt -> 400 with the
    reason (middleware.input_error), for this request alone."""
    from PIL import Image
    from pydantic import ValidationError

    try:
        out = handler(value)
    except ValidationError:
        raise
    except Image.DecompressionBombError as e:
        raise input_error("ImageTooLarge", f"the image is too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
        raise input_error("NotAnImage" if isinstance(e, OSError) else "BadInput",
                          f"cannot decode the input: {type(e).__name__}: {e}") from None
    limit = settings.runtime().max_image_pixels
    for im in (out if isinstance(out, (list, tuple)) else [out]):
        if isinstance(im, Image.Image):
            try:
                load_checked(im, limit)
            except InputError as e:
                raise input_error(e.kind, e.message) from None
    return out


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
    (input it cannot use), NaN/infinite values or pixels outside [0, 1] (Guardian.check_inputs) are a
    400; a result that is no (B, C, H, W) tensor is a bug of the service (500)."""
    from bentoml.exceptions import BadInput

    x = _as_input_tensor(_run_preprocess(settings, instance, api, value))
    if not bool(torch.isfinite(x).all()):
        raise BadInput("[NonFiniteInput] the input contains NaN or infinite values")
    bad = next((d for d in settings.runtime().guardian.check_inputs(x) if d is not None), None)
    if bad is not None:  # the model answers only what the detector scores
        raise BadInput(f"[{bad.kind}] {bad.message}")
    return x


def _guard_call(settings, api, x, probs, admissions):
    return settings.runtime().guard(api, x, probs, admissions)
