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

Modules: decorator (guard, protect, the Service hook), api (rewriting an API method, Tagged batch
rows), middleware, runtime (the per-process Guardian), conversion, metrics, target (BentoTarget).
"""

from __future__ import annotations

from guardian_plugin.bento.api import Tagged
from guardian_plugin.bento.decorator import GuardSettings, guard, install_service_hook, protect
from guardian_plugin.bento.middleware import GuardianMiddleware

__all__ = ["guard", "protect", "GuardianMiddleware", "GuardSettings", "install_service_hook", "Tagged", "BentoTarget"]


def __getattr__(name: str):
    """``BentoTarget`` subclasses QueryTarget; built on first use so that serving never imports the
    attack package."""
    if name == "BentoTarget":
        from guardian_plugin.attacks.target import QueryTarget
        from guardian_plugin.bento.target import _BentoTarget

        cls = type("BentoTarget", (_BentoTarget, QueryTarget), {"__module__": __name__, "__doc__": _BentoTarget.__doc__})
        globals()["BentoTarget"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
