"""Running the sandbox: blocking :func:`serve` for the CLI, :class:`SandboxServer` for tests."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

from aiohttp import web

from worker.sandbox.app import SANDBOX_KEY, create_app
from worker.sandbox.config import SandboxConfig
from worker.sandbox.deployment import Sandbox

__all__ = ["SandboxServer", "serve"]

# Requests hanging in a simulated timeout are woken on shutdown; anything else
# still running after this long is cancelled rather than delaying exit.
_SHUTDOWN_TIMEOUT_S: Final = 1.0
_STOP_JOIN_TIMEOUT_S: Final = 10.0


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start(config: SandboxConfig, host: str, port: int) -> tuple[web.AppRunner, Sandbox, str]:
    """Bind and start serving; return the runner, the sandbox and its base URL."""
    app = create_app(config)
    # access_log=None: per-request logging would dominate CPU in benchmarks.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    # With port 0 the OS picks the port; report the real one.
    bound_port = runner.addresses[0][1]
    return runner, app[SANDBOX_KEY], _url(host, bound_port)


def serve(
    host: str,
    port: int,
    config: SandboxConfig | None = None,
    *,
    on_started: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; call ``on_started(url)`` once listening.

    Prints nothing itself.  Must run in the main thread (signal handlers).
    """
    asyncio.run(_serve(host, port, config or SandboxConfig(), on_started))


async def _serve(
    host: str, port: int, config: SandboxConfig, on_started: Callable[[str], None] | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, _, url = await _start(config, host, port)
        try:
            if on_started is not None:
                on_started(url)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


class SandboxServer:
    """The sandbox on a background thread with its own event loop.

    Usage::

        with SandboxServer() as sandbox:
            httpx.post(f"{sandbox.url}/api/v2/auth", json={...})

    Binds 127.0.0.1 on an OS-chosen port by default.  ``start()`` after
    ``stop()`` starts a fresh sandbox (new state, new tokens).
    """

    def __init__(
        self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        """Prepare a server; nothing runs until :meth:`start`."""
        self._config = config or SandboxConfig()
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._sandbox: Sandbox | None = None
        self._url: str | None = None
        self._error: BaseException | None = None

    @property
    def config(self) -> SandboxConfig:
        """The configuration the server was created with."""
        return self._config

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (only while running)."""
        if self._url is None:
            raise RuntimeError("SandboxServer is not running")
        return self._url

    @property
    def port(self) -> int:
        """The bound TCP port (only while running)."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def system_user_token(self) -> str:
        """The current system user token (what ``/auth`` returns)."""
        if self._sandbox is None:
            raise RuntimeError("SandboxServer is not running")
        # A str attribute read: safe from another thread.
        return self._sandbox.state.tokens.system_user_token

    def start(self) -> Self:
        """Start serving and block until the port is bound; raise if binding fails."""
        if self._thread is not None:
            raise RuntimeError("SandboxServer is already running")
        self._error = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="verloop-sandbox", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(
                f"sandbox failed to start on {self._host}:{self._port}: {self._error}"
            ) from self._error
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread to finish (no-op if not running)."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            # The loop may already be closed if the thread died on its own.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(_STOP_JOIN_TIMEOUT_S)
        self._thread = self._loop = self._stop_event = None
        self._sandbox = None
        self._url = None

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def _run(self, started: threading.Event) -> None:
        try:
            asyncio.run(self._main(started))
        except BaseException as exc:  # noqa: BLE001  # handed to start() in the caller's thread
            self._error = exc
        finally:
            started.set()

    async def _main(self, started: threading.Event) -> None:
        runner, sandbox, url = await _start(self._config, self._host, self._port)
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._sandbox, self._url = sandbox, url
        started.set()
        try:
            await self._stop_event.wait()
        finally:
            await runner.cleanup()
