"""The evaluation config: YAML in, typed objects out, errors that name the file and field.

Relative paths (victim weights, detectors, cache) are taken relative to the config file. Example:
benchmarks/attacks_mnist.yaml.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from guardian_plugin.config import (DEFAULT_WINDOW, DEFAULT_WINDOW_RHO, DistributionConfig, ProbationConfig, QuotaConfig,
                                    read_yaml, validate)

CONFIGURATIONS = ("no_defense", "model_guardian", "dpreds_only", "detector_only", "raw_detector", "defense_in_depth",
                  "prada")
BASELINES = ("prada",)  # published defenses measured beside ours, not part of Model-Guardian
CONFIG_TITLES = {
    "no_defense": "No defense",
    "dpreds_only": "DPreds only (w/o DFMS-Detector)",
    "detector_only": "Detector + refusal (w/o DPreds)",
    "model_guardian": "Model-Guardian",
    "raw_detector": "Raw-image detector (w/o gradient transformation)",
    "defense_in_depth": "Defense in depth (Model-Guardian + window, quotas, probation, distribution test)",
    "prada": "PRADA (baseline: inter-query distance test, Juuti et al. 2019)",
}


def _check_configurations(names, what: str = "configurations") -> None:
    bad = [c for c in names if c not in CONFIGURATIONS]
    if bad:
        raise ValueError(f"{what}: unknown configurations {bad}; known: {list(CONFIGURATIONS)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VictimSpec(_Strict):
    arch: str = "small_resnet"
    arch_params: Dict[str, Any] = {}
    weights: str
    num_classes: int = 10
    channels: int = 1
    size: int = 28
    mean: List[float] = [0.0]
    std: List[float] = [1.0]


class CloneSpec(_Strict):
    arch: str = "lenet5"
    arch_params: Dict[str, Any] = {}


class DepthSpec(_Strict):
    """The defense_in_depth configuration's mechanisms; every default is the shipped guard-config default
    (guardian_plugin.config), except probation, which a guard config leaves off (docs/refusal-rule.md)."""

    window: int = Field(DEFAULT_WINDOW, ge=0)
    window_rho: float = Field(DEFAULT_WINDOW_RHO, ge=0.0, lt=1.0)
    quota: QuotaConfig = QuotaConfig()
    probation: ProbationConfig = ProbationConfig(queries=200)
    distribution: DistributionConfig = DistributionConfig()

    def rule(self, tau: int, rho: float, dist=None):
        from guardian_plugin.ledger import RefusalRule

        return RefusalRule(tau, rho, window=self.window, window_rho=self.window_rho, **self.quota.rule_fields(),
                           dist_bins=dist.reference.bins if dist else 0, dist_block=dist.block if dist else 0)


class PradaSpec(_Strict):
    """The prada configuration (guardian_plugin.prada, docs/prada.md): ``delta`` given, or read from
    ``delta_file`` (the JSON `python -m guardian_plugin.prada calibrate` writes) under ``dataset``."""

    delta: Optional[float] = Field(None, gt=0.0, le=1.0)
    delta_file: Optional[str] = None
    dataset: Optional[str] = None        # the key in delta_file: mnist, cifar10
    min_distances: int = Field(100, ge=3)
    max_kept: int = Field(5000, ge=1)
    check_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_delta(self):
        if self.delta is not None and self.delta_file is not None:
            raise ValueError("give guard.prada.delta or guard.prada.delta_file (+ dataset), not both")
        if self.delta_file is not None and not self.dataset:
            raise ValueError("guard.prada.delta_file needs guard.prada.dataset (its key: mnist, cifar10)")
        return self

    def resolve_delta(self) -> float:
        from guardian_plugin.prada import load_delta

        return self.delta if self.delta is not None else load_delta(self.delta_file, self.dataset)


class GuardSpec(_Strict):
    detector: Optional[str] = None       # gradient detector artifact (Model-Guardian, detector_only)
    raw_detector: Optional[str] = None   # artifact with `transform: identity` (raw_detector row)
    tau: Union[int, str] = "auto"
    rho: float = Field(0.5, ge=0.0, lt=1.0)
    d: float = Field(0.5, ge=0.0)
    quantize: bool = False               # round queries to 8-bit pixels, as PNGs over HTTP would
    depth: DepthSpec = DepthSpec()       # the defense_in_depth configuration's settings
    prada: PradaSpec = PradaSpec()       # the prada (baseline) configuration's settings

    @field_validator("tau")
    @classmethod
    def _tau(cls, v):
        if isinstance(v, str) and v != "auto":
            raise ValueError("tau must be an integer >= 1 or 'auto'")
        if isinstance(v, int) and v < 1:
            raise ValueError("tau must be >= 1")
        return v

    def resolve_tau(self) -> int:
        from guardian_plugin.config import RuleConfig

        return RuleConfig(tau=self.tau, rho=self.rho).resolve_tau()


class AttackSpec(_Strict):
    id: Optional[str] = None             # row name; defaults to the attack name (+ label mode)
    attack: str
    label_mode: Optional[str] = None     # the attack's default when omitted
    budget: int = Field(..., ge=1)
    params: Dict[str, Any] = {}
    aware: Dict[str, Any] = {}           # defense-aware strategies (guardian_plugin.attacks.aware)
    configurations: Optional[List[str]] = None  # default: every configuration of the config
    # default: the config's seeds; a list for every configuration of this attack, or a mapping
    # configuration -> seeds (configurations it leaves out get the config's seeds)
    seeds: Optional[Union[List[int], Dict[str, List[int]]]] = None
    seen: Optional[bool] = None          # the detector trained on this attack's source (dfme)

    @model_validator(mode="after")
    def _defaults(self):
        if self.id is None:
            self.id = self.attack + (f"-{self.label_mode}" if self.label_mode else "")
        if self.seen is None:
            self.seen = self.attack == "dfme" and not self.aware
        _check_configurations(self.configurations or [])
        if isinstance(self.seeds, dict):
            _check_configurations(self.seeds, "seeds")
        return self


class EvalConfig(_Strict):
    name: str = "evaluation"
    seeds: List[int] = [0]
    device: str = "cpu"
    threads: Optional[int] = None
    victim: VictimSpec
    test_data: str = "mnist"             # mnist | cifar10:<split> | file:<path.pt with x uint8 (N,C,H,W), y>
    split_seed: int = 0
    test_limit: Optional[int] = None
    clone: CloneSpec = CloneSpec()
    guard: GuardSpec = GuardSpec()
    # default: every configuration but the baselines (prada needs its calibrated delta: guard.prada)
    configurations: List[str] = [c for c in CONFIGURATIONS if c not in BASELINES]
    eval_points: int = Field(10, ge=1)   # clone evaluations per run
    benign_batch: int = Field(1, ge=1)   # images per benign request (refusal acts between requests)
    benign_replay: int = Field(0, ge=0)  # queries of one benign identity replaying the test set (0: off)
    photo_replay: int = Field(0, ge=0)   # queries of one client sending natural photo crops (0: off)
    detection_windows: List[int] = [50, 500]   # Table II batch sizes
    detection_samples: int = Field(5, ge=1)    # windows recorded along each no-defense query stream
    cache_dir: str = ".cache/attacks"
    attacks: List[AttackSpec]

    @field_validator("attacks")
    @classmethod
    def _attack_params(cls, v: List[AttackSpec], info: ValidationInfo):
        """Every attack's ``params`` checked against the attack's declared parameters, with what the
        harness adds (the victim's mean, std and classes, the cache), so a misspelt or mistyped key
        fails here, before anything runs."""
        from guardian_plugin.attacks.base import ATTACKS

        victim = info.data.get("victim")
        given = {"cache_dir": info.data.get("cache_dir")}
        if victim is not None:
            given.update(mean=victim.mean, std=victim.std, num_classes=victim.num_classes)
        for i, a in enumerate(v):
            try:
                ATTACKS.check(a.attack, {**given, **a.params})
            except KeyError as e:
                raise ValueError(f"attacks[{i}].attack: {e.args[0]}") from None
            except ValueError as e:
                raise ValueError(f"attacks[{i}].params (id {a.id!r}): {e}") from None
        return v

    @field_validator("configurations")
    @classmethod
    def _configs(cls, v):
        _check_configurations(v)
        return v

    @field_validator("test_data")
    @classmethod
    def _test_data(cls, v):
        from guardian_plugin.training.data import CIFAR10_SPLITS

        if v.startswith("cifar10:") and v[8:] not in CIFAR10_SPLITS:
            raise ValueError(f"cifar10:<split> needs one of {', '.join(CIFAR10_SPLITS)} (got {v[8:]!r})")
        return v

    @model_validator(mode="after")
    def _check(self):
        ids = [a.id for a in self.attacks]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"attack ids must be unique; repeated: {dup}")
        need = set(self.configurations) | {c for a in self.attacks for c in (a.configurations or [])}
        if need & {"model_guardian", "detector_only", "defense_in_depth"} and not self.guard.detector:
            raise ValueError("guard.detector is required for the model_guardian / detector_only / defense_in_depth "
                             "configurations")
        if "raw_detector" in need and not self.guard.raw_detector:
            raise ValueError("guard.raw_detector is required for the raw_detector configuration")
        if "prada" in need and self.guard.prada.delta is None and self.guard.prada.delta_file is None:
            raise ValueError("the prada configuration needs guard.prada.delta, or guard.prada.delta_file + dataset "
                             "(written by `python -m guardian_plugin.prada calibrate`)")
        return self

    def configurations_for(self, a: AttackSpec) -> List[str]:
        return [c for c in (a.configurations or self.configurations)]

    def seeds_for(self, a: AttackSpec, configuration: str) -> List[int]:
        if isinstance(a.seeds, dict):
            return list(a.seeds.get(configuration, self.seeds))
        return list(a.seeds if a.seeds is not None else self.seeds)


def _resolve(base: str, p: Optional[str]) -> Optional[str]:
    if p is None or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base, p))


def parse_eval_config(raw: Any, source: str = "<config>", base_dir: Optional[str] = None) -> EvalConfig:
    cfg = validate(EvalConfig, raw, source)
    if base_dir:
        cfg.victim.weights = _resolve(base_dir, cfg.victim.weights)
        cfg.guard.detector = _resolve(base_dir, cfg.guard.detector)
        cfg.guard.raw_detector = _resolve(base_dir, cfg.guard.raw_detector)
        cfg.guard.prada.delta_file = _resolve(base_dir, cfg.guard.prada.delta_file)
        cfg.cache_dir = _resolve(base_dir, cfg.cache_dir)
        if cfg.test_data.startswith("file:"):
            cfg.test_data = "file:" + _resolve(base_dir, cfg.test_data[5:])
    return cfg


def load_eval_config(path: str) -> EvalConfig:
    return parse_eval_config(read_yaml(path), path, os.path.dirname(os.path.abspath(path)))
