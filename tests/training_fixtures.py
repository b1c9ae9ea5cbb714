"""Shared by the train-detector tests."""

from __future__ import annotations

import contextlib

import pytest

from guardian_plugin.training import pipeline


@contextlib.contextmanager
def real_data_once():
    """While active, each real-data entry is read once (``pipeline.load_real`` memoised on the entry,
    the size and the channels): MNIST and the photos take seconds to read."""
    memo, load = {}, pipeline.load_real

    def cached(e, cfg, base_dir):
        key = (e.model_dump_json(), cfg.size, cfg.channels)
        if key not in memo:
            memo[key] = load(e, cfg, base_dir)
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_real", cached)
        yield
