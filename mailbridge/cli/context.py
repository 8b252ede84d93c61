"""The lazy per-invocation context every `mailbridge` command receives."""

from __future__ import annotations

import click

from mailbridge.config import ConfigError, load_settings
from mailbridge.runtime import Runtime, build_runtime
from mailbridge.settings import Settings
from mailbridge.store import schema


class Context:
    """Settings are loaded lazily so `--help` works without a config file."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._runtime: Runtime | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = build_runtime(self.settings)
        return self._runtime

    def ready_runtime(self) -> Runtime:
        """A runtime whose database schema is current (commands that read or write rows)."""
        runtime = self.runtime
        version = schema.current_version(runtime.db)
        if version < schema.LATEST:
            raise ConfigError(f"[database] url: the database is at schema version {version}, "
                              f"expected {schema.LATEST}; run `mailbridge init` or "
                              "`mailbridge db upgrade`")
        return runtime


pass_ctx = click.make_pass_decorator(Context)
