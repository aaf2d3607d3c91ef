"""AWS played by moto in server mode on loopback, and a recording door in front of its STS.

``MotoServer`` runs moto's whole API (IAM, STS, S3, …) on 127.0.0.1 and a port the
kernel chose when it bound.
``StsDoor`` is a small loopback HTTP server that forwards each request to moto and
records the form it carried (so a test can check the OIDC token the broker sent), or
answers with an STS error instead when told to.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import boto3
from aiohttp import web
from moto.server import ThreadedMotoServer

from tests.harness.ports import serve_app

ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
# Keys moto accepts for the test's own (and the broker's) signed calls; not real.
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "moto-not-a-real-secret"


class MotoServer:
    def __init__(self) -> None:
        # Port 0: the server binds a port the kernel chooses, read back once it is up. (A
        # number chosen beforehand may be taken by then, and moto's start() would then
        # wait forever for a server that failed to bind.)
        self.port = 0
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        self._server.stop()

    def client(self, service: str, **credentials: Any) -> Any:
        creds = credentials or {
            "aws_access_key_id": ACCESS_KEY_ID,
            "aws_secret_access_key": SECRET_ACCESS_KEY,
        }
        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **creds)


def sts_error(code: str) -> bytes:
    return (
        f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        f"<Type>Sender</Type><Code>{code}</Code><Message>refused by the test</Message>"
        "</Error><RequestId>test</RequestId></ErrorResponse>"
    ).encode()


class StsDoor:
    def __init__(self, target: str) -> None:
        self.target = target
        self.port = 0
        self.forms: list[dict[str, str]] = []
        self.fail_with: tuple[int, str] | None = None  # (status, STS error code)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_app(app, access_log=None)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.forms.append(dict(parse_qsl(body.decode())))
        if self.fail_with is not None:
            status, code = self.fail_with
            return web.Response(status=status, body=sts_error(code), content_type="text/xml")
        assert self._http is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")
        }
        async with self._http.request(
            request.method, f"{self.target}{request.path_qs}", data=body, headers=headers
        ) as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="text/xml")
