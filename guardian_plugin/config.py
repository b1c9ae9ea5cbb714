"""Typed guard configuration: YAML in, validated objects out, errors that name the file and field.

Example (every key optional but ``detector``)::

    detector: examples/mnist/artifacts/detector   # artifact directory
    ledger: sqlite:///var/lib/guardian/ledger.db  # memory:// | sqlite:///path | redis://host:6379/0
    namespace: mnist                               # separates protected models in one store
    ledger_failure: closed                         # store down: closed (HTTP 503) | open (serve, log, keep counts)
    mode: enforce                                  # observe: decide and record everything, change no answer
                                                   # (docs/rollout.md: roll out in observe, replay, then enforce)
    rule: {tau: auto, rho: 0.5}                    # auto: the binomial bound in docs/refusal-rule.md
                                                   # sliding window (default window: 200, window_rho: 0.3; 0 = off)
    quota: {queries: 10000, flagged: 1000, period: 1d, lease: 150s}  # per client and period: HTTP 429 + Retry-After; 0 = off
    probation: {queries: 0, response: label}       # new identities: label-only answers until N benign ones
    distribution: {enabled: auto, block: 200}      # per-client distribution test (artifact's reference.json;
                                                   # auto: at every input size, off where the served path
                                                   # resamples to a size the reference was not measured at)
    response: {policy: dpreds, d: 0.5}             # label_only: top1 | topk (k: 2) for label-only models
    identity:                                      # guardian_plugin/identity.py: which mode to trust
      headers: [X-Client-Id]                       # first present header wins, case-insensitive
      api_key_header: null                         # e.g. X-Api-Key: issued keys only, the ONLY identity
      key_secret: null                             # or env GUARDIAN_KEY_SECRET (required with api keys)
      key_secret_previous: null                    # or env GUARDIAN_KEY_SECRET_PREVIOUS (secret rotation)
      key_refresh_s: 5                             # revoked keys are refused within this many seconds
      trusted_proxy: null                          # {secret_header: X-Gateway-Secret, secret_env: ...}
      missing: reject                              # HTTP 401; or anonymous (never refused, always DPreds)
    device: cpu
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guardian_plugin.errors import ConfigError


DEFAULT_MAX_PIXELS = 12_000_000  # a 4000 x 3000 photo; see guardian_plugin.inputs
# defense-in-depth defaults, justified in docs/refusal-rule.md
DEFAULT_WINDOW, DEFAULT_WINDOW_RHO = 200, 0.3
DEFAULT_QUOTA, DEFAULT_FLAGGED_QUOTA = 10_000, 1_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuleConfig(_Strict):
    tau: Union[int, Literal["auto"]] = "auto"
    rho: float = Field(0.5, ge=0.0, lt=1.0)
    # assumptions behind tau: auto
    assumed_fpr: float = Field(0.05, gt=0.0, lt=0.5)
    max_false_refusal: float = Field(1e-6, gt=0.0, lt=1.0)
    # sliding window (docs/refusal-rule.md): also refuse when more than window_rho of the last `window`
    # queries were flagged; 0 = off
    window: int = Field(DEFAULT_WINDOW, ge=0, le=100_000)
    window_rho: Optional[float] = Field(DEFAULT_WINDOW_RHO, ge=0.0, lt=1.0)

    @field_validator("tau")
    @classmethod
    def _tau(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("tau must be >= 1 or 'auto'")
        return v

    def resolve_tau(self) -> int:
        if self.tau != "auto":
            return int(self.tau)
        from guardian_plugin.ledger.base import default_tau

        return default_tau(self.rho, self.assumed_fpr, self.max_false_refusal)

    def to_rule(self, quota: "QuotaConfig | None" = None, dist_bins: int = 0, dist_block: int = 0):
        from guardian_plugin.ledger.base import RefusalRule

        q = quota.rule_fields() if quota is not None else {}
        return RefusalRule(self.resolve_tau(), self.rho, window=self.window, window_rho=self.window_rho,
                           dist_bins=dist_bins, dist_block=dist_block if dist_bins else 0, **q)


class QuotaConfig(_Strict):
    """Per-client quotas per fixed period (docs/refusal-rule.md): over them, HTTP 429 + Retry-After."""

    queries: int = Field(DEFAULT_QUOTA, ge=0)           # answered queries per client and period; 0 = off
    flagged: int = Field(DEFAULT_FLAGGED_QUOTA, ge=0)   # flagged answers per client and period; 0 = off
    period: Union[int, str] = "1d"                       # 3600, 90s, 30m, 12h, 1d
    # a granted query is held this long for its answer; held queries whose answer never left (the worker
    # died) stop counting after it (docs/ledger.md "Holds"). Keep it above the server's response timeout
    lease: Union[int, str] = "150s"

    @field_validator("period", "lease")
    @classmethod
    def _period(cls, v, info):
        from guardian_plugin.ledger.base import parse_duration

        if parse_duration(v) < 1:
            raise ValueError(f"{info.field_name} must be at least 1 s")
        return v

    def rule_fields(self) -> Dict[str, int]:
        from guardian_plugin.ledger.base import parse_duration

        return {"quota": self.queries, "flagged_quota": self.flagged, "quota_period_s": parse_duration(self.period),
                "quota_lease_s": parse_duration(self.lease)}


class ProbationConfig(_Strict):
    """New identities (docs/refusal-rule.md): until a client has ``queries`` answered queries that were
    not flagged, every answer it gets is ``response`` (label: the top-1 class only; dpreds)."""

    queries: int = Field(0, ge=0)  # 0 = off
    response: Literal["label", "dpreds"] = "label"


class DistributionConfig(_Strict):
    """The per-client distribution test (guardian_plugin.distribution)."""

    # auto: when the detector artifact has reference.json, at every served input size (other sizes are
    # scored through the detector's input mapping, as for per-sample detection). Off for a deployment whose
    # served path, probed at load (TorchServe), resizes to a size the reference was not measured at (a
    # resizing handler shifts the features; `guardian protect --calibrate` builds the reference on that
    # path); without a probe (BentoML), inputs the detector would have to resample are not tested.
    # true: always (a warning where the reference does not describe the path). docs/refusal-rule.md
    enabled: Union[bool, Literal["auto"]] = "auto"
    block: int = Field(200, ge=20, le=100_000)       # queries per tested block
    max_false: float = Field(1e-6, gt=0, lt=1)       # a benign client's chance of ever failing ...
    horizon: int = Field(10_000, ge=1)               # ... over this many queries (union bound)


class ResponseConfig(_Strict):
    policy: str = "dpreds"
    d: float = Field(0.5, ge=0.0)
    # a served model that answers labels only (a TorchServe archive whose postprocess returns the argmax;
    # DPreds changes nothing there): top1 keeps the model's label on flagged rows, topk answers a label
    # drawn uniformly from its top k classes (guardian_plugin.responses.LabelOnlyResponse)
    label_only: Literal["top1", "topk"] = "top1"
    k: int = Field(2, ge=2)

    def params(self) -> Dict[str, Any]:
        return {"d": self.d} if self.policy == "dpreds" else {}


class TrustedProxyConfig(_Strict):
    secret_header: str = "X-Gateway-Secret"  # the header carrying the gateway's shared secret
    secret_env: str = "GUARDIAN_GATEWAY_SECRET"  # the environment variable holding that secret


class IdentityConfig(_Strict):
    """How requests are mapped to clients; see guardian_plugin.identity for the trust each mode gives.

    With ``api_key_header`` (recommended in production) only keys issued by ``guardian keys issue``
    are accepted (guardian_plugin.keys): signed with ``key_secret`` (else the environment variable
    GUARDIAN_KEY_SECRET; required, at least 16 characters, the same for every worker and the CLI);
    ``key_secret_previous`` (else GUARDIAN_KEY_SECRET_PREVIOUS) is also accepted while keys are
    re-issued after a secret rotation. Revoked keys (``guardian keys revoke``) are refused within
    ``key_refresh_s`` seconds."""

    headers: List[str] = ["X-Client-Id"]
    api_key_header: Optional[str] = None  # when set, an issued API key is the only identity
    key_secret: Optional[str] = None  # else env GUARDIAN_KEY_SECRET; required with api_key_header
    key_secret_previous: Optional[str] = None  # else env GUARDIAN_KEY_SECRET_PREVIOUS (rotation)
    key_refresh_s: float = Field(5.0, ge=0.0, le=3600.0)  # how often each process reads the revoked keys
    salt: Optional[str] = None  # removed (hashed any-string keys); rejected with what to do instead
    trusted_proxy: Optional[TrustedProxyConfig] = None  # ids from `headers` only on gateway requests
    missing: Literal["reject", "anonymous"] = "reject"
    anonymous_id: str = "anonymous"  # the label of anonymous requests in logs and metrics
    max_length: int = Field(128, ge=1, le=256)

    @field_validator("headers")
    @classmethod
    def _some_header(cls, v):
        if not v:
            raise ValueError("at least one identity header is needed")
        return v

    @field_validator("salt")
    @classmethod
    def _no_salt(cls, v):
        if v is not None:
            raise ValueError("API keys are no longer any string hashed with a salt: they are issued keys. Remove "
                             "salt, set key_secret (or GUARDIAN_KEY_SECRET) and give each client a key from "
                             "`guardian keys issue --owner NAME` (docs/request-path.md)")
        return v


class GuardConfig(_Strict):
    detector: str
    ledger: str = "sqlite://guardian-ledger.db"
    namespace: str = "default"
    ledger_failure: Literal["closed", "open"] = "closed"  # see guardian_plugin.ledger.resilient
    # observe: every mechanism decides and the ledger and metrics record it, but every admitted request gets
    # the unprotected model's answer (Guardian.observe; docs/rollout.md)
    mode: Literal["enforce", "observe"] = "enforce"
    rule: RuleConfig = RuleConfig()
    quota: QuotaConfig = QuotaConfig()
    probation: ProbationConfig = ProbationConfig()
    distribution: DistributionConfig = DistributionConfig()
    response: ResponseConfig = ResponseConfig()
    identity: IdentityConfig = IdentityConfig()
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # larger images: 400 before decoding (guardian_plugin.inputs)
    device: str = "cpu"
    allow_mismatch: bool = False  # guard a model the detector was not trained for (guardian_plugin.fit): warn only


def format_errors(e: ValidationError) -> str:
    """pydantic errors as ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors())


def read_yaml(path: str, error: type = ConfigError, what: str = "config file") -> Any:
    """A YAML file's contents; a missing file or bad YAML raises ``error`` naming the file."""
    if not os.path.exists(path):
        raise error(f"{path}: no such {what}")
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from None


def validate(model: type, raw: Any, source: str, error: type = ConfigError):
    """``model.model_validate(raw)``; every problem raises ``error`` naming the source and the fields."""
    if not isinstance(raw, dict):
        raise error(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(f"{source}: {format_errors(e)}") from None


def parse_config(raw: Any, source: str = "<config>", base_dir: str | None = None) -> GuardConfig:
    cfg = validate(GuardConfig, raw, source)
    if base_dir and not os.path.isabs(cfg.detector):
        cfg.detector = os.path.normpath(os.path.join(base_dir, cfg.detector))
    return cfg


def operator_config(config: Optional[str] = None, archive: Optional[str] = None) -> Optional[GuardConfig]:
    """The guard config the operator tools (``guardian clients``, ``guardian keys``) take their ledger,
    namespace and rule from: ``--config guard.yaml``, or ``--archive MAR``, the config a protected
    archive embeds (its namespace is the model's name); None when neither is given."""
    if config and archive:
        raise ConfigError("give --config or --archive, not both")
    if archive:
        from guardian_plugin.handlers.archive import archive_guard_config

        return archive_guard_config(archive)
    return load_config(config) if config else None


def load_config(path: str) -> GuardConfig:
    """Read a guard YAML file; relative ``detector`` paths are taken relative to the file."""
    return parse_config(read_yaml(path), path, base_dir=os.path.dirname(os.path.abspath(path)))
