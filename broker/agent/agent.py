"""The agent's loop: adopt or issue every credential, write it, keep it fresh, announce
rotations, give back replaced leases, and on exit give back per ``--on-exit``.

Each credential has its own ``Keeper`` task; the decisions (adopt or not, when to renew,
when to issue afresh, what an answer means, how long to back off) are the pure functions
of ``broker.agent.plan``; this module only performs them. The state file is rewritten
after every change, so a restarted agent (or the long-running agent after the init run)
adopts instead of issuing again.

Logs name credentials, roles, lease ids and the broker's error codes; never a credential
value, a key or the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from broker.agent import answers, files, hooks, keys, plan, process, state
from broker.agent.answers import AnswerUnreadable
from broker.agent.client import Answer, BrokerClient
from broker.agent.options import AgentConfig
from broker.agent.plan import CredentialStatus, Due, Outcome, Status, Step
from broker.agent.ready import ready_app, serve
from broker.agent.render import GeneratedKey, RenderError, render
from broker.agent.spec import CredentialSpec
from broker.agent.state import AgentState, Entry, Lease, Retired
from broker.clock import Clock, SystemClock
from broker.errors import ConfigError

log = logging.getLogger("broker.agent")


class BrokerApi(Protocol):
    async def issue(self, role: str, ttl: int | None, params: dict[str, str]) -> Answer: ...
    async def renew(self, lease_id: str) -> Answer: ...
    async def release(self, lease_id: str) -> Answer: ...
    async def terminate(self) -> Answer: ...


def _own_failure(code: str, problem: str) -> Answer:
    """A failure of the agent's own, shown like the broker's (code in /ready and logs)."""
    return Answer(None, {"error": {"code": code}}, problem=problem)


@dataclass
class Shared:
    """What every keeper reads and changes: one event loop, so no lock is needed as long
    as a change and its save happen without an ``await`` between them."""

    config: AgentConfig
    client: BrokerApi
    clock: Clock
    state: AgentState
    statuses: dict[str, CredentialStatus]
    released: asyncio.Event  # set when a lease is retired, to wake the releaser
    jitter: Callable[[], float] = random.random

    def save(self) -> None:
        try:
            state.save(self.config.state_path, self.state)
        except OSError as exc:  # the files are right; only a restart would issue again
            log.warning(
                "cannot write the state file",
                extra={"path": str(self.config.state_path), "reason": exc.strerror},
            )

    def retire(self, lease: Lease, now: datetime) -> None:
        if not lease.leased or lease.expires_at <= now:
            return  # nothing to give back
        retired = Retired(lease.lease_id, plan.release_at(lease, now), lease.expires_at)
        self.state = self.state.with_retired((*self.state.retired, retired))
        self.released.set()


class Keeper:
    """One credential: issue or adopt it, then renew or issue it afresh for as long as
    the agent runs (or, with ``once``, until it is written)."""

    def __init__(self, spec: CredentialSpec, shared: Shared) -> None:
        self.spec = spec
        self.s = shared
        self.attempt = 0

    @property
    def entry(self) -> Entry | None:
        return self.s.state.credentials.get(self.spec.name)

    def _status(self, status: Status, code: str | None = None) -> None:
        entry = self.entry
        expires = entry.lease.expires_at if entry is not None else None
        self.s.statuses[self.spec.name] = CredentialStatus(status, expires, code)

    async def run(self, due: Due, stop: asyncio.Event, once: bool) -> bool:
        """Until ``stop``; with ``once``, until the credential is current (True) or
        refused (False)."""
        while not stop.is_set():
            delay = (due.at - self.s.clock.now()).total_seconds()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
            try:
                due, done = await (self.issue() if due.step is Step.ISSUE else self.renew())
            except Exception:  # a bug must not end this credential's upkeep, or the agent
                log.exception(
                    "unexpected failure; trying again", extra={"credential": self.spec.name}
                )
                due, done = self._failed(
                    due.step, Outcome.UNAVAILABLE, _own_failure("agent_error", "unexpected failure")
                )
            if once and done is not None:
                return done
        return False

    # -- issue ---------------------------------------------------------------------------

    def _key_params(self) -> tuple[str | None, ...]:
        if not self.spec.keygen:
            return (None,)
        if self.spec.cn:
            return ("csr",)
        known = self.entry.key_param if self.entry else None
        return tuple(sorted(keys.KEY_PARAMS, key=lambda p: p != known))

    async def issue(self) -> tuple[Due, bool | None]:
        spec, answer = self.spec, Answer(None)
        key: GeneratedKey | None = None
        param: str | None = None
        for param in self._key_params():
            params: dict[str, str] = {}
            if param is not None and spec.keygen:
                private = await asyncio.to_thread(keys.generate, spec.keygen)
                params[param] = keys.request_param(private, param, spec.cn)
                key = keys.private_file(private, param)
            answer = await self.s.client.issue(spec.role, spec.ttl, params)
            outcome = plan.classify_issue(answer.status, answer.code)
            if answer.ok or outcome is not Outcome.OTHER_KEY:
                break
        now = self.s.clock.now()
        if not answer.ok:
            outcome = plan.classify_issue(answer.status, answer.code)
            return self._failed(
                Step.ISSUE, Outcome.REFUSED if outcome is Outcome.OTHER_KEY else outcome, answer
            )
        try:
            lease, issued = answers.issued(answer.body, now)
        except AnswerUnreadable as exc:
            return self._failed(
                Step.ISSUE,
                Outcome.UNAVAILABLE,
                Answer(answer.status, problem=f"unreadable answer: {exc}"),
            )
        try:
            written = render(spec, issued, key)
        except RenderError as exc:
            log.error(
                "credential cannot be written in its format; giving it back",
                extra={"credential": spec.name, "role": spec.role, "reason": str(exc)},
            )
            await self.s.client.release(lease.lease_id)
            failure = _own_failure("format_mismatch", "the format does not fit the credential")
            return self._failed(Step.ISSUE, Outcome.REFUSED, failure)
        replaced = files.existing(self.s.config.directory, written)
        try:
            files.write_all(self.s.config.directory, written, spec.perms)
        except OSError as exc:
            # Not kept: a credential no file holds is given back at once, not leaked.
            log.error(
                "cannot write the credential's files; giving it back",
                extra={"credential": spec.name, "reason": exc.strerror},
            )
            await self.s.client.release(lease.lease_id)
            failure = _own_failure("write_failed", "cannot write the files")
            return self._failed(Step.ISSUE, Outcome.UNAVAILABLE, failure)
        old = self.entry.lease if self.entry else None
        entry = Entry(
            spec.role, spec.digest(), tuple(sorted(written)), lease, param if spec.keygen else None
        )
        self.s.state = self.s.state.with_entry(spec.name, entry)
        if old is not None and old.lease_id != lease.lease_id:
            self.s.retire(old, now)
        self.s.save()
        self.attempt = 0
        self._status(Status.READY)
        log.info(
            "credential written",
            extra={
                "credential": spec.name,
                "role": spec.role,
                "lease_id": lease.lease_id,
                "expires_at": lease.expires_at.isoformat(),
                "rotation": replaced,
                "replaced_lease": old.lease_id if old else None,
            },
        )
        if replaced:
            await self._announce()
        return plan.next_due(lease), True

    async def _announce(self) -> None:
        try:
            await self._run_hooks()
        except Exception:  # the credential is written and recorded: never issue it again
            log.exception("rotation hook failed", extra={"credential": self.spec.name})

    async def _run_hooks(self) -> None:
        spec = self.spec
        if spec.command:
            code = await hooks.run_command(spec.command, self.s.config.directory)
            log.info(
                "rotation command ran",
                extra={"credential": spec.name, "program": spec.command[0], "exit_code": code},
            )
        if spec.signal:
            sent, denied = hooks.send_signal(spec.signal.number, spec.signal.process)
            extra = {
                "credential": spec.name,
                "signal": spec.signal.signal,
                "process_name": spec.signal.process,
                "processes": sent,
            }
            if denied or not sent:
                log.warning(
                    "rotation signal reached no process or not all of them: the app's "
                    "containers need shareProcessNamespace and the agent's user",
                    extra={**extra, "not_permitted": denied},
                )
            else:
                log.info("rotation signal sent", extra=extra)

    # -- renew ---------------------------------------------------------------------------

    async def renew(self) -> tuple[Due, bool | None]:
        entry = self.entry
        if entry is None:
            return Due(Step.ISSUE, self.s.clock.now()), None
        if entry.lease.expires_at <= self.s.clock.now():
            # Renewal came too late (a broker outage, a starved process): the lease is
            # dead, and Vault may no longer know it at all.
            log.info(
                "lease expired before it was renewed; issuing a new credential",
                extra={"credential": self.spec.name, "lease_id": entry.lease.lease_id},
            )
            return Due(Step.ISSUE, self.s.clock.now()), None
        answer = await self.s.client.renew(entry.lease.lease_id)
        now = self.s.clock.now()
        if not answer.ok:
            outcome = plan.classify_renew(
                answer.status, answer.code, expired=entry.lease.expires_at <= now
            )
            if outcome is Outcome.REISSUE:
                log.info(
                    "lease can no longer be renewed; issuing a new credential",
                    extra={
                        "credential": self.spec.name,
                        "lease_id": entry.lease.lease_id,
                        "code": answer.code,
                    },
                )
                return Due(Step.ISSUE, now), None
            return self._failed(Step.RENEW, outcome, answer)
        try:
            got = answers.renewal(answer.body)
        except AnswerUnreadable as exc:
            return self._failed(
                Step.RENEW,
                Outcome.UNAVAILABLE,
                Answer(answer.status, problem=f"unreadable answer: {exc}"),
            )
        lease = plan.renewed(
            entry.lease,
            now=now,
            expires_at=got.expires_at,
            renewable=got.renewable,
            max_expires_at=got.max_expires_at,
            near_max_ttl=got.near_max_ttl,
        )
        self.s.state = self.s.state.with_entry(
            self.spec.name, Entry(entry.role, entry.digest, entry.files, lease, entry.key_param)
        )
        self.s.save()
        self.attempt = 0
        self._status(Status.READY)
        log.info(
            "lease renewed",
            extra={
                "credential": self.spec.name,
                "lease_id": lease.lease_id,
                "expires_at": lease.expires_at.isoformat(),
                "near_max_ttl": lease.near_max,
            },
        )
        return plan.next_due(lease), True

    # -- failures ------------------------------------------------------------------------

    def _failed(self, step: Step, outcome: Outcome, answer: Answer) -> tuple[Due, bool | None]:
        self.attempt += 1
        delay = plan.retry_in(outcome, self.attempt, self.s.jitter())
        extra = {
            "credential": self.spec.name,
            "role": self.spec.role,
            "step": step.value,
            "status": answer.status,
            "code": answer.code,
            "reason": answer.message,
            "attempt": self.attempt,
            "retry_in_s": round(delay.total_seconds(), 1),
        }
        if outcome is Outcome.REFUSED:
            self._status(Status.REFUSED, answer.code or "refused")
            log.error("the broker refused the credential", extra=extra)
            return Due(step, self.s.clock.now() + delay), False
        written = self.entry is not None and self.s.statuses[self.spec.name].status in (
            Status.READY,
            Status.RETRYING,
        )
        self._status(
            Status.RETRYING if written else Status.PENDING, answer.code or "broker_unavailable"
        )
        log.warning("the broker is unavailable; keeping the files and trying again", extra=extra)
        return Due(step, self.s.clock.now() + delay), None


class Agent:
    def __init__(self, config: AgentConfig, client: BrokerApi, clock: Clock | None = None) -> None:
        self.config = config
        loaded, problem = state.load(config.state_path)
        if problem:
            log.warning(
                "state file not used; starting afresh",
                extra={"path": str(config.state_path), "reason": problem},
            )
        self.shared = Shared(config, client, clock or SystemClock(), loaded, {}, asyncio.Event())

    def _plan_start(self) -> dict[str, Due | None]:
        """Adopt what an earlier run wrote, or plan to issue it; leases of credentials no
        longer asked for, or not adopted, are given back once replaced. None: adopted and
        nothing to do before it is due."""
        s, now = self.shared, self.shared.clock.now()
        first: dict[str, Due | None] = {}
        names = {spec.name for spec in self.config.credentials}
        for name, gone in list(s.state.credentials.items()):
            if name not in names:
                s.retire(gone.lease, now)
                s.state = s.state.with_entry(name, None)
        for spec in self.config.credentials:
            entry = s.state.credentials.get(spec.name)
            present = entry is not None and files.all_present(self.config.directory, entry.files)
            decided = plan.adoption(entry, spec, present, now)
            log.info(
                "credential at start",
                extra={
                    "credential": spec.name,
                    "role": spec.role,
                    "adopted": decided.adopted,
                    "reason": decided.reason,
                },
            )
            if decided.adopted and entry is not None:
                s.statuses[spec.name] = CredentialStatus(Status.READY, entry.lease.expires_at)
                due = plan.after_adoption(entry.lease, now)
                first[spec.name] = None if self.config.once and due.at > now else due
            else:
                s.statuses[spec.name] = CredentialStatus(Status.PENDING)
                first[spec.name] = Due(Step.ISSUE, now)
        s.save()
        return first

    async def run(self, stop: asyncio.Event) -> int:
        files.remove_leftovers(self.config.directory)
        first = self._plan_start()
        runner = None
        if self.config.ready_listen:
            app = ready_app(lambda: self.shared.statuses, self.shared.clock.now)
            host, port = self.config.ready_listen
            try:
                runner = await serve(app, self.config.ready_listen)
            except OSError as exc:
                raise ConfigError(f"--ready-listen {host}:{port}: {exc.strerror}") from None
        halt = asyncio.Event()  # stops the keepers: on ``stop``, or when --once is done
        keepers: dict[str, asyncio.Task[bool]] = {}
        for spec in self.config.credentials:
            due = first[spec.name]
            if due is not None:
                keeper = Keeper(spec, self.shared)
                keepers[spec.name] = asyncio.create_task(keeper.run(due, halt, self.config.once))
        releaser = asyncio.create_task(self._release_retired(halt))
        try:
            if self.config.once:
                written = await self._until_written(keepers, stop, halt)
                if written or not stop.is_set():
                    return 0 if written else 1
            else:
                await stop.wait()
            # SIGTERM/SIGINT: a call in flight may finish briefly, then everything is given
            # back per --on-exit, all within --exit-timeout.
            deadline = asyncio.get_running_loop().time() + self.config.exit_timeout_s
            halt.set()
            if keepers:
                await asyncio.wait(
                    keepers.values(), timeout=min(5.0, self.config.exit_timeout_s / 4)
                )
            for keeper_task in keepers.values():
                keeper_task.cancel()
            await self._give_back(deadline - asyncio.get_running_loop().time())
            return 1 if self.config.once else 0  # --once interrupted: not everything written
        finally:
            halt.set()
            releaser.cancel()
            for keeper_task in keepers.values():
                keeper_task.cancel()
            await asyncio.gather(*keepers.values(), releaser, return_exceptions=True)
            if runner is not None:
                await runner.cleanup()

    async def _until_written(
        self, keepers: dict[str, asyncio.Task[bool]], stop: asyncio.Event, halt: asyncio.Event
    ) -> bool:
        """--once: True once every credential is written; False when one is refused or
        a signal comes first."""
        stopped = asyncio.create_task(stop.wait())
        pending: set[asyncio.Future[Any]] = {*keepers.values(), stopped}
        try:
            while keepers and not all(t.done() for t in keepers.values()):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [n for n, t in keepers.items() if t.done() and t.result() is not True]
                if failed or stop.is_set():
                    halt.set()
                    why = "refused" if failed else "interrupted before it was written"
                    for name in failed or [n for n, t in keepers.items() if not t.done()]:
                        log.error(f"--once: credential {why}", extra={"credential": name})
                    return False
            return True
        finally:
            stopped.cancel()

    async def _release_retired(self, halt: asyncio.Event) -> None:
        """Give back replaced leases when their grace period ends."""
        s = self.shared
        attempts: dict[str, int] = {}
        while not halt.is_set():
            s.released.clear()
            now = s.clock.now()
            due = [r for r in s.state.retired if r.release_at <= now]
            for r in due:
                answer = await s.client.release(r.lease_id)
                verdict = plan.classify_release(answer.status, answer.code)
                if verdict is plan.Release.RETRY and r.expires_at > s.clock.now():
                    attempts[r.lease_id] = attempts.get(r.lease_id, 0) + 1
                    later = s.clock.now() + plan.retry_in(
                        Outcome.UNAVAILABLE, attempts[r.lease_id], s.jitter()
                    )
                    kept = Retired(r.lease_id, later, r.expires_at)
                    s.state = s.state.with_retired(
                        tuple(kept if x.lease_id == r.lease_id else x for x in s.state.retired)
                    )
                else:
                    log.info(
                        "replaced lease given back",
                        extra={
                            "lease_id": r.lease_id,
                            "outcome": verdict.value,
                            "code": answer.code,
                        },
                    )
                    s.state = s.state.with_retired(
                        tuple(x for x in s.state.retired if x.lease_id != r.lease_id)
                    )
                s.save()
            upcoming = [r.release_at for r in s.state.retired]
            wait = (min(upcoming) - s.clock.now()).total_seconds() if upcoming else 3600.0
            waiters = {asyncio.create_task(halt.wait()), asyncio.create_task(s.released.wait())}
            await asyncio.wait(
                waiters, timeout=max(wait, 0.05), return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()

    async def _give_back(self, within: float) -> None:
        """Per ``--on-exit``, within ``within`` seconds."""
        on_exit, s = self.config.on_exit, self.shared
        if on_exit == "keep":
            log.info("exiting; leases kept (on-exit keep)")
            return
        try:
            async with asyncio.timeout(max(within, 0.1)):
                if on_exit == "terminate":
                    answer = await s.client.terminate()
                    if answer.ok or answer.code == "instance_terminated":
                        log.info(
                            "instance terminated (on-exit terminate)",
                            extra={"status": answer.status},
                        )
                        self._forget_all()
                        return
                    log.warning(
                        "could not terminate the instance; giving back each lease",
                        extra={
                            "status": answer.status,
                            "code": answer.code,
                            "reason": answer.message,
                        },
                    )
                await self._release_all()
        except TimeoutError:
            log.warning(
                "giving back did not finish within --exit-timeout; the broker's "
                "own termination sources remain",
                extra={"exit_timeout_s": self.config.exit_timeout_s},
            )

    async def _release_all(self) -> None:
        s = self.shared
        ids = [e.lease.lease_id for e in s.state.credentials.values() if e.lease.leased]
        ids += [r.lease_id for r in s.state.retired]
        answers = await asyncio.gather(*(s.client.release(i) for i in ids))
        given = {
            i
            for i, a in zip(ids, answers, strict=True)
            if plan.classify_release(a.status, a.code) is plan.Release.DONE
        }
        log.info(
            "leases given back (on-exit release)",
            extra={"released": len(given), "failed": len(ids) - len(given)},
        )
        for name, entry in list(s.state.credentials.items()):
            if entry.lease.lease_id in given or not entry.lease.leased:
                s.state = s.state.with_entry(name, None)
        s.state = s.state.with_retired(tuple(r for r in s.state.retired if r.lease_id not in given))
        s.save()

    def _forget_all(self) -> None:
        self.shared.state = AgentState()
        self.shared.save()


def main(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT (or, with ``--once``, until written)."""
    from broker.logs import configure_logging

    configure_logging("info")
    process.not_dumpable()  # before the token or a credential is ever read

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tls = config.broker_tls()
        async with BrokerClient(config.broker_url, config.token_file, tls) as client:
            return await Agent(config, client).run(stop)

    return asyncio.run(run())
