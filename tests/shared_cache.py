"""The tests' cache directory: the service's own (`Settings.cache_dir`: TRAIL_CACHE, default ~/.cache/trail), read
once here, so every test and run shares the parsed datasets, the converted base model and the exported test
artefact. The code under test reads no environment: tests hand this directory down (the `cache_dir` fixture)."""

from __future__ import annotations

from stream.settings import load_settings

CACHE_DIR = load_settings().cache_dir
