"""Hot reload of a policy file: re-read it when it changes, keep the last good policy on a bad edit."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from guardrails.policy import PolicySet, parse_policy_set
from schemas.errors import ConfigError

log = logging.getLogger(__name__)


class PolicyReloader:
    """Holds the current PolicySet of one file; `poll()` (or the `run()` task) picks up edits.

    The first load happens in the constructor and raises ConfigError, so a bad file stops start-up; later
    bad edits keep the previous policy, set `last_error` and call `on_error`. Reads the current policy with
    `reloader.current`, an atomic attribute read.
    """

    def __init__(self, path: Path | str, *, interval_s: float = 2.0,
                 on_reload: Callable[[PolicySet], None] | None = None,
                 on_error: Callable[[ConfigError], None] | None = None):
        self.path = Path(path)
        self.interval_s = interval_s
        self.on_reload, self.on_error = on_reload, on_error
        self.last_error: ConfigError | None = None
        self.generation = 0
        self._stamp = self._stat()
        text = self._read()
        self._digest = hashlib.sha256(text.encode()).hexdigest()
        self.current: PolicySet = parse_policy_set(text, str(self.path))

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read guardrail policy {self.path}: {e.strerror or e}",
                              details={"file": str(self.path)}) from e

    def _fail(self, err: ConfigError) -> None:
        if self.last_error is None or self.last_error.message != err.message:
            log.warning("guardrail policy not reloaded, keeping the last good one: %s", err.message)
        self.last_error = err
        if self.on_error is not None:
            self.on_error(err)

    def poll(self) -> bool:
        """Reload if the file changed; True when a new policy took effect. Never raises for a bad file."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            text = self._read()
        except ConfigError as e:
            self._fail(e)
            return False
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest and self.last_error is None:
            return False
        try:
            policy_set = parse_policy_set(text, str(self.path))
        except ConfigError as e:
            self._digest = digest
            self._fail(e)
            return False
        self._digest = digest
        self.current = policy_set
        self.last_error = None
        self.generation += 1
        log.info("guardrail policy reloaded from %s (generation %d)", self.path, self.generation)
        if self.on_reload is not None:
            self.on_reload(policy_set)
        return True

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll every `interval_s` until `stop` is set or the task is cancelled; parsing runs in a thread."""
        while stop is None or not stop.is_set():
            if stop is None:
                await asyncio.sleep(self.interval_s)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), self.interval_s)
                    return
                except TimeoutError:
                    pass
            await asyncio.to_thread(self.poll)
