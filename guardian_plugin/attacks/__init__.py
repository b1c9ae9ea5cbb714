"""Data-free model stealing attacks, one module each, sharing :class:`guardian_plugin.attacks.base.Attack`."""

from guardian_plugin.attacks.base import ATTACKS, Attack, AttackResult, build_attack, recover_logits  # noqa: F401
from guardian_plugin.attacks.target import InProcessTarget, QueryRefused, QueryTarget  # noqa: F401
