"""Data-free model stealing attacks, one module each, sharing :class:`guardian_plugin.attacks.base.Attack`
(and :class:`guardian_plugin.attacks.generator.GeneratorAttack` for the attacks that train a generator);
the query targets they talk to are in :mod:`guardian_plugin.attacks.target`."""

from guardian_plugin.attacks.base import (ATTACKS, Attack, AttackParamError, AttackParams, AttackResult,  # noqa: F401
                                          build_attack, recover_logits)
from guardian_plugin.attacks.target import (BentoTarget, EvalTarget, InProcessTarget, QueryRefused,  # noqa: F401
                                            QueryTarget, TorchServeTarget)
