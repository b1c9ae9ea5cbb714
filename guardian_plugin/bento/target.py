"""Where ``guardian_plugin.bento.BentoTarget`` comes from: the BentoML query target lives with the other
query targets, in :mod:`guardian_plugin.attacks.target` (this module only re-exports it, for the lazy
``BentoTarget`` of :mod:`guardian_plugin.bento`; serving never imports it)."""

from guardian_plugin.attacks.target import BentoTarget as _BentoTarget  # noqa: F401
