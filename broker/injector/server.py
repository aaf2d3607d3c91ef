"""``broker injector``'s HTTP side: ``POST /mutate`` (AdmissionReview in, AdmissionReview
out), ``GET /healthz`` and ``GET /metrics``, over TLS with the certificate reloaded as it
rotates (``broker.tls``).

The handler decodes, asks the broker's policy preview where configured, calls the pure
decision, encodes. Whatever the pod in a well-formed review looks like, the answer is a
200 AdmissionReview: a bug shows as a refused pod with a sentence pointing at the log,
never as a 5xx (which ``failurePolicy: Fail`` would turn into a refusal without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from broker.api.errors import error_response
from broker.errors import ConfigError
from broker.injector.metrics import InjectorMetrics
from broker.injector.model import PreviewAnswer, Refusal
from broker.injector.mutate import preview_query
from broker.injector.preview import PreviewClient
from broker.injector.review import MalformedReview, Outcome, admit, answer, decode
from broker.injector.settings import InjectorSettings, parse_listen
from broker.listen import bind_socket
from broker.settings import is_loopback
from broker.tls import CaBundle, CertificateReloader

log = logging.getLogger("broker.injector")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# An AdmissionReview carries the pod (and for updates its old version); the API server
# itself refuses request bodies over 3 MiB.
MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_S = 10.0
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@dataclass(frozen=True)
class Injector:
    config: InjectorSettings
    metrics: InjectorMetrics
    preview: PreviewClient | None
    ca: CaBundle | None = None  # agent.ca_file, handed to each agent as --ca-pem


INJECTOR: web.AppKey[Injector] = web.AppKey("injector", Injector)


async def _decide(injector: Injector, raw: bytes) -> tuple[str, str, Outcome] | MalformedReview:
    # Decoding and the pure decisions run in worker threads: bounded as they are (see
    # broker.injector.annotations), a 3 MiB review still takes milliseconds of CPU, which
    # must not hold up /healthz or the other reviews waiting on the event loop.
    try:
        review = await asyncio.to_thread(decode, raw)
    except MalformedReview as exc:
        return exc
    try:
        preview = None
        query = (
            await asyncio.to_thread(preview_query, review.object, review.namespace, injector.config)
            if review.pod_create and injector.preview is not None
            else None
        )
        if query is not None and injector.preview is not None:
            preview = await injector.preview.ask(query)
            outcome_word = "answered" if isinstance(preview, PreviewAnswer) else "unavailable"
            injector.metrics.previews.labels(outcome=outcome_word).inc()
        ca_pem = injector.ca.current() if injector.ca is not None else None
        outcome = await asyncio.to_thread(
            admit, review, injector.config, preview, ca_pem=ca_pem
        )
    except Exception:
        log.exception("admission failed unexpectedly", extra={"namespace": review.namespace})
        outcome = Refusal("the injector failed unexpectedly; see its log", code=500)
    return review.uid, review.namespace, outcome


async def mutate_handler(request: web.Request) -> web.Response:
    injector = request.app[INJECTOR]
    started = time.perf_counter()
    decided = await _decide(injector, await request.read())
    if isinstance(decided, MalformedReview):
        injector.metrics.malformed.inc()
        return error_response(400, "malformed_review", decided.message)
    uid, namespace, outcome = decided
    injector.metrics.observe(namespace, outcome, time.perf_counter() - started)
    if isinstance(outcome, Refusal):
        log.info("pod refused", extra={"namespace": namespace, "reason": outcome.message[:500]})
    return web.json_response(answer(uid, outcome))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[INJECTOR].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason or "request refused")
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal_error", "the injector failed unexpectedly")


def build_app(injector: Injector) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[INJECTOR] = injector
    app.router.add_post("/mutate", mutate_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    return app


class InjectorServer:
    """The listening webhook: ``start`` binds (and answers the URL), ``run(stop)`` serves
    and keeps the certificate fresh until ``stop`` is set."""

    def __init__(self, config: InjectorSettings, *, insecure_http: bool = False) -> None:
        self._host, self._port = parse_listen(config.listen)
        if insecure_http and not is_loopback(self._host):
            raise ConfigError(
                f"--insecure-http: only on a loopback address (tests, development); "
                f"listen is {config.listen}"
            )
        self.config = config
        self.metrics = InjectorMetrics()
        self.tls = (
            None
            if insecure_http
            else CertificateReloader(config.tls.cert_file, config.tls.key_file)
        )
        ca_file = config.agent.ca_file
        self.ca = None if ca_file is None else CaBundle(Path(ca_file), where="agent.ca_file")
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url: str | None = None

    def _preview(self) -> PreviewClient | None:
        settings = self.config.preview
        if settings is None:
            return None
        self._session = aiohttp.ClientSession()
        return PreviewClient(
            self._session,
            self.config.preview_url,
            settings.token_file,
            settings.timeout_s,
            settings.ca_file,
        )

    async def start(self) -> str:
        # Bound first: a port in use stops start-up with one line, before anything opens.
        sock = bind_socket(self._host, self._port)
        app = build_app(Injector(self.config, self.metrics, self._preview(), self.ca))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=DRAIN_S)
        await self._runner.setup()
        context = self.tls.server_context if self.tls is not None else None
        await web.SockSite(self._runner, sock, ssl_context=context).start()
        host, port = sock.getsockname()[:2]
        scheme = "http" if self.tls is None else "https"
        self.url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
        self._observe_tls()
        log.info("injector listening", extra={"url": self.url})
        return self.url

    def _observe_tls(self) -> None:
        if self.tls is not None:
            self.metrics.tls_reloads.labels(outcome="loaded").set(self.tls.reloads)
            self.metrics.tls_reloads.labels(outcome="failed").set(self.tls.failures)
            self.metrics.tls_not_after.set(self.tls.not_after)

    async def run(self, stop: asyncio.Event) -> None:
        if self._runner is None:
            await self.start()
        try:
            if self.tls is None:
                await stop.wait()
            else:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.config.tls.reload_s)
                    self.tls.check()
                    self._observe_tls()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
