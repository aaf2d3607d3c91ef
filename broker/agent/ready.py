"""The agent's probe endpoint: ``GET /ready`` answers 200 once every credential is written
and none is refused, 503 otherwise, with each credential's status (no value, no lease
id); ``GET /healthz`` answers 200 while the agent runs. The kubelet probes the pod's IP,
so the injector binds it to 0.0.0.0; it shows nothing a neighbour could use."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from aiohttp import web

from broker.agent.plan import CredentialStatus, readiness
from broker.clock import iso_z


def status_document(statuses: Mapping[str, CredentialStatus], now: datetime) -> dict[str, object]:
    credentials: dict[str, object] = {}
    for name, s in sorted(statuses.items()):
        shown: dict[str, object] = {"status": s.at(now).value}
        if s.expires_at is not None:
            shown["expires_at"] = iso_z(s.expires_at)
        if s.code is not None:
            shown["code"] = s.code
        credentials[name] = shown
    return {"ready": readiness(statuses, now), "credentials": credentials}


def ready_app(
    statuses: Callable[[], Mapping[str, CredentialStatus]], now: Callable[[], datetime]
) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        doc = status_document(statuses(), now())
        return web.json_response(doc, status=200 if doc["ready"] else 503)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(app: web.Application, listen: tuple[str, int]) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, listen[0], listen[1]).start()
    return runner
