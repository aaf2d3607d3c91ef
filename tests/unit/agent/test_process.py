"""The agent's process is not dumpable: a process of the same uid (the app, when the
injector runs the agent as the app's uid in a pod that shares its process namespace) can
still be signalled by it, but can no longer read the agent's mounts (its broker token)
through /proc/<agent>/root. Shown with two real processes of one unprivileged uid, with
and without the protection, so the test can tell the difference."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import pytest

from broker.agent import process

UID = 65533  # an unprivileged uid no other test uses
READABLE, DENIED, NO_SIGNAL = 10, 11, 12


def _become_app_user() -> None:
    """As a container's process: an unprivileged uid, and dumpable (as after exec)."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(UID)
        os.setuid(UID)
    ctypes.CDLL(None).prctl(process.PR_SET_DUMPABLE, 1, 0, 0, 0)


def _child(body: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    return pid


@pytest.mark.parametrize(("protected", "expected"), [(False, READABLE), (True, DENIED)],
                         ids=["dumpable", "not-dumpable"])
def test_a_process_of_the_same_uid_cannot_read_the_agents_mounts(
        protected: bool, expected: int) -> None:
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()

    def agent() -> int:
        _become_app_user()
        ok = process.not_dumpable() if protected else True
        os.write(ready_w, b"1" if ok else b"0")
        os.read(done_r, 1)  # until the other process has looked
        return 0

    def app() -> int:
        _become_app_user()
        try:
            os.kill(agent_pid, 0)  # a signal is still allowed
        except PermissionError:
            return NO_SIGNAL
        try:
            os.listdir(f"/proc/{agent_pid}/root/")
        except PermissionError:
            return DENIED
        return READABLE

    agent_pid = _child(agent)
    try:
        assert os.read(ready_r, 1) == b"1"
        app_pid = _child(app)
        _, status = os.waitpid(app_pid, 0)
        assert os.waitstatus_to_exitcode(status) == expected
    finally:
        os.write(done_w, b"x")
        os.waitpid(agent_pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
