"""The class decorator ``guard``, its function form ``protect``, what they were told (GuardSettings)
and the hook that attaches the middleware when BentoML builds the Service."""

from __future__ import annotations

import functools
import os
import sys
import threading
import typing as t
from dataclasses import dataclass, field

from guardian_plugin.bento.api import _wrap_api
from guardian_plugin.bento.middleware import GuardianMiddleware
from guardian_plugin.bento.runtime import CONFIG_ENV, LEDGER_ENV, _Runtime
from guardian_plugin.config import GuardConfig, load_config, parse_config

GUARD_ATTR = "__guardian_guard__"


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
        """Build this worker's Guardian (detector + ledger) before the first request, and keep the
        service instance so that each request's input is preprocessed in its own validator."""
        settings.runtime().instance = self

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
    paths = {}
    for name in settings.api_names:
        route = join_paths(svc.path_prefix, svc.apis[name].route)
        spec = svc.apis[name].input_spec
        fields = (frozenset(spec.model_fields), frozenset(getattr(spec, "multipart_fields", ()) or ()))
        paths.update({route: fields, route.rstrip("/") or "/": fields})
    svc.add_asgi_middleware(GuardianMiddleware, settings=settings, paths=paths)


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
