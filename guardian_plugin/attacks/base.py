"""Shared base of the data-free stealing attacks: exact query accounting, a budget, refusal handling,
seeds, progress, and periodic clone evaluation.

Subclasses implement :meth:`Attack.step` (one iteration; it calls :meth:`Attack.query` for every image
it sends) and may override :meth:`Attack.after_refusal` to keep training on what they already have.
Every answered (query, answer) pair is kept in :attr:`Attack.memory` (a reservoir of ``memory`` rows,
default 20,000), which attacks with experience replay reuse and which the default
:meth:`Attack.after_refusal` trains the clone on once the target stops answering.

Parameters are typed: each attack class declares its own in a nested ``Params`` model (a subclass of
:class:`AttackParams`, which declares the ones every attack takes), and the constructor validates what
it is given against it. A key the attack does not declare, or a value of the wrong type, is a
:class:`AttackParamError` naming the attack, the field and the known keys. The typed values are
:attr:`Attack.cfg`; :attr:`Attack.params` keeps the keyword arguments as given (reported in
:attr:`AttackResult.extra`). ``ATTACKS.params(name)`` lists an attack's parameters.
"""

from __future__ import annotations

import abc
import difflib
import math
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from guardian_plugin.attacks.target import QueryRefused, QueryTarget
from guardian_plugin.registry import Registry


# ------------------------------------------------------------------------------- parameters
class AttackParamError(ValueError):
    """An attack parameter the attack does not declare, or a value of the wrong type."""


class AttackParams(BaseModel):
    """The parameters every attack takes. ``mean``, ``std``, ``num_classes`` and ``cache_dir`` are what
    the evaluation harness passes every attack (the victim's normalisation and classes, the config's
    cache); each attack's ``Params`` adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: List[float] = Field([0.0], description="the victim's normalisation mean, per channel (the harness "
                                                 "passes the victim's)")
    std: List[float] = Field([1.0], description="the victim's normalisation std, per channel (the harness "
                                                "passes the victim's)")
    num_classes: int = Field(10, description="the victim's number of classes (the harness passes the victim's)")
    cache_dir: Optional[str] = Field(None, description="where trained proxy GANs are cached (the harness passes "
                                                       "the config's `cache_dir`)")
    memory: int = Field(20000, description="rows of answered (query, answer) pairs kept (reservoir)")
    refusal_epochs: int = Field(20, description="passes over `memory` once refused")
    lr_refusal: float = Field(0.01, description="SGD lr of the training after a refusal")


COMMON_PARAMS = tuple(AttackParams.model_fields)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} | None" if len(args) < len(typing.get_args(annotation)) else inner
    if origin in (list, List):
        (arg,) = typing.get_args(annotation) or (Any,)
        return f"list[{_type_name(arg)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _description(model: type, name: str) -> str:
    """A field's description; a subclass that only changes a default inherits its parent's."""
    for m in model.__mro__:
        f = getattr(m, "model_fields", {}).get(name)
        if f is not None and f.description:
            return f.description
    return ""


def param_info(model: type) -> List[dict]:
    """An attack's parameters: name, type, default, description and whether every attack takes it."""
    return [{"name": k, "type": _type_name(f.annotation), "default": f.get_default(call_default_factory=True),
             "description": _description(model, k), "common": k in COMMON_PARAMS}
            for k, f in model.model_fields.items()]


def check_params(name: str, model: type, params: Mapping[str, Any]) -> BaseModel:
    """``params`` validated against ``model`` (an :class:`AttackParams` subclass) for attack ``name``."""
    known = list(model.model_fields)
    unknown = [k for k in params if k not in model.model_fields]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            parts.append(repr(k) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise AttackParamError(f"attack {name!r}: unknown parameter{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(parts)}; known: {', '.join(sorted(known))}")
    try:
        return model.model_validate(dict(params))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg} (got {err['input']!r})" if where else msg)
        raise AttackParamError(f"attack {name!r}: bad parameter {'; '.join(problems)}") from None


class AttackRegistry(Registry):
    """The attack registry: registering a class under a name sets its ``name`` (the one place an
    attack's name is given), and every registered attack's parameters can be listed."""

    def register(self, name: str) -> Callable[[type], type]:
        add = super().register(name)

        def deco(cls: type) -> type:
            if "name" in vars(cls):
                raise TypeError(f"{cls.__name__}: the registry gives an attack its name; do not set `name`")
            add(cls)
            cls.name = name
            return cls

        return deco

    def get(self, name: str) -> Callable:
        _import_all()
        return super().get(name)

    def names(self) -> list:
        _import_all()
        return super().names()

    def params(self, name: str) -> List[dict]:
        """The parameters attack ``name`` takes (see :func:`param_info`)."""
        return param_info(self.get(name).Params)

    def check(self, name: str, params: Mapping[str, Any]) -> BaseModel:
        """Validate ``params`` for attack ``name``: raises :class:`AttackParamError` (unknown attack: KeyError)."""
        cls = self.get(name)
        return check_params(cls.name, cls.Params, params)


ATTACKS = AttackRegistry("attack")


class BudgetExhausted(Exception):
    pass


class ReplayBuffer:
    """Answered (query, answer) pairs on the CPU: everything up to ``capacity`` rows, then a uniform
    reservoir sample of everything seen."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = int(capacity)
        self.x: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None
        self.size = 0
        self.seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        x, y = x.detach().float().cpu(), y.detach().float().cpu()
        if self.x is None:
            self.x = torch.empty(self.capacity, *x.shape[1:])
            self.y = torch.empty(self.capacity, *y.shape[1:])
        free = min(self.capacity - self.size, x.shape[0])
        if free > 0:
            self.x[self.size:self.size + free], self.y[self.size:self.size + free] = x[:free], y[:free]
            self.size += free
            self.seen += free
        for i in range(max(free, 0), x.shape[0]):
            self.seen += 1
            if self.size < self.capacity:
                j = self.size
                self.size += 1
            else:
                j = int(torch.randint(self.seen, (1,), generator=self._gen))
                if j >= self.capacity:
                    continue
            self.x[j], self.y[j] = x[i], y[i]

    def sample(self, n: int, device=None):
        idx = torch.randint(self.size, (min(n, self.size),), generator=self._gen)
        return self.x[idx].to(device), self.y[idx].to(device)


def recover_logits(probs: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Soft-label logit recovery: l_i = log p_i - mean_j log p_j.

    Probabilities are clamped at the smallest normal number of their dtype (not a fixed 1e-8): a
    confident victim's float32 answers carry information down to ~1e-38, and clamping at 1e-8 flattens
    every logit gap above ~18 into one value."""
    lp = probs.clamp_min(torch.finfo(probs.dtype).tiny if eps is None else eps).log()
    return lp - lp.mean(1, keepdim=True)


@dataclass
class AttackResult:
    attack: str
    queries: int
    clone_accuracy: float
    history: List[dict] = field(default_factory=list)  # [{queries, clone_accuracy, seconds}]
    refused_at: Optional[int] = None
    seconds: float = 0.0
    seed: int = 0
    extra: dict = field(default_factory=dict)


class Attack(abc.ABC):
    """One data-free attack against a :class:`QueryTarget` with a query budget.

    ``**params`` are the attack's parameters, validated against its :attr:`Params` (see the module doc).
    """

    name = "attack"  # set by ATTACKS.register
    label_modes = ("soft",)
    Params = AttackParams

    def __init__(self, target: QueryTarget, clone: nn.Module, *, budget: int, image_shape, label_mode: str = "soft",
                 device: str | torch.device = "cpu", seed: int = 0,
                 evaluate: Optional[Callable[[nn.Module], float]] = None, eval_every: int = 0,
                 progress: bool = True, **params):
        if label_mode not in self.label_modes:
            raise ValueError(f"{self.name} supports label modes {self.label_modes}, not {label_mode!r}")
        self.target = target
        self.device = torch.device(device)
        self.clone = clone.to(self.device)
        self.budget = int(budget)
        self.image_shape = tuple(image_shape)  # (C, H, W)
        self.label_mode = label_mode
        self.seed = seed
        self.evaluate = evaluate
        self.eval_every = eval_every or max(self.budget // 10, 1)
        self.progress = progress
        self.cfg = self.check_params(params)
        # as given; memory and refusal_epochs were never reported in AttackResult.extra
        self.params = {k: v for k, v in params.items() if k not in ("memory", "refusal_epochs")}
        self.memory = ReplayBuffer(self.cfg.memory, seed)
        self.refusal_epochs = self.cfg.refusal_epochs
        self.queries = 0  # the attack's own count; must equal the target's
        self.refused = False
        self.refused_at: Optional[int] = None
        self.history: List[dict] = []
        self._next_eval = self.eval_every
        self._t0 = 0.0
        self._bar = None
        torch.manual_seed(seed)
        self.setup()

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> AttackParams:
        """``params`` validated against :attr:`Params`; raises :class:`AttackParamError`."""
        return check_params(cls.name, cls.Params, params)

    # --------------------------------------------------------------------------------- hooks
    def setup(self) -> None:
        """Build generators and optimisers (subclasses)."""

    @abc.abstractmethod
    def step(self) -> None:
        """One iteration (subclasses). Raise BudgetExhausted / QueryRefused through query()."""

    def received(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """What the attacker makes of an answer before using it (identity; defense-aware attackers)."""
        return probs

    def clone_loss(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Distillation loss on answers as :meth:`query` returns them: cross-entropy on the argmax in
        hard-label mode, L1 on recovered logits in soft-label mode (attacks override)."""
        if self.label_mode == "hard":
            return nn.functional.cross_entropy(logits, answers.argmax(1))
        return nn.functional.l1_loss(logits, recover_logits(answers))

    def after_refusal(self) -> None:
        """Train on what the attack already has once the target stops answering: ``refusal_epochs``
        passes over :attr:`memory` with :meth:`clone_loss` (SGD, lr ``lr_refusal``, default 0.01)."""
        n = len(self.memory)
        if n == 0 or self.refusal_epochs <= 0:
            return
        opt = torch.optim.SGD(self.clone.parameters(), lr=self.cfg.lr_refusal, momentum=0.9, weight_decay=5e-4)
        batch = min(128, n)
        self.clone.train()
        for _ in range(self.refusal_epochs * max(n // batch, 1)):
            x, y = self.memory.sample(batch, self.device)
            loss = self.clone_loss(self.clone(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    # ------------------------------------------------------------------------------- helpers
    @property
    def remaining(self) -> int:
        return self.budget - self.queries

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Send a batch; returns probabilities, or argmax one-hots in hard-label mode. Counts queries."""
        if self.refused:
            raise QueryRefused("already refused")
        if x.shape[0] > self.remaining:
            raise BudgetExhausted()
        try:
            probs = self.target.query(x.detach())
        except QueryRefused:
            self.refused, self.refused_at = True, self.queries
            raise
        self.queries += x.shape[0]
        if self._bar is not None:
            self._bar.update(x.shape[0])
        if self.queries >= self._next_eval:
            self._record()
            self._next_eval += self.eval_every
        probs = self.received(x, probs.to(self.device))
        if self.label_mode == "hard":
            probs = nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float()
        self.memory.add(x, probs)
        return probs

    def _record(self) -> None:
        if self.evaluate is None:
            return
        was = self.clone.training
        acc = float(self.evaluate(self.clone))
        self.clone.train(was)
        self.history.append({"queries": self.queries, "clone_accuracy": acc, "seconds": time.time() - self._t0})
        if self._bar is not None:
            self._bar.set_postfix(cacc=f"{acc:.3f}")

    def noise(self, n: int, nz: int) -> torch.Tensor:
        return torch.randn(n, nz, device=self.device)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> AttackResult:
        self._t0 = time.time()
        self._bar = tqdm(total=self.budget, desc=self.name, unit="q", disable=not self.progress, leave=False)
        try:
            while self.remaining > 0 and not self.refused:
                try:
                    self.step()
                except BudgetExhausted:
                    break
                except QueryRefused:
                    break
            if self.refused:
                self.after_refusal()
        finally:
            self._bar.close()
            self._bar = None
        if self.evaluate is not None and (not self.history or self.history[-1]["queries"] != self.queries or self.refused):
            self._record()
        acc = self.history[-1]["clone_accuracy"] if self.history else math.nan
        return AttackResult(self.name, self.queries, acc, self.history, self.refused_at, time.time() - self._t0,
                            self.seed, {"label_mode": self.label_mode, **{k: v for k, v in self.params.items()
                                                                          if isinstance(v, (int, float, str, bool))}})


def build_attack(name: str, *args, **kw) -> Attack:
    return ATTACKS.get(name)(*args, **kw)


def _import_all() -> None:
    import importlib
    import pkgutil

    import guardian_plugin.attacks as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in ("base", "target", "common", "generator", "docs"):
            importlib.import_module(f"guardian_plugin.attacks.{m.name}")
