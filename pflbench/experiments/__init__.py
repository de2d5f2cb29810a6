"""Experiments: settings in, run records on disk.

`config` (one frozen dataclass per run), `presets` and `options` (settings shared by the CLI,
presets and config files), `runner` (one run from a config), `records` (run files, written
atomically), `sweep` (grids, resumable) and `executors` (local processes, Ray).
"""
