"""A lease held by a process of this host that is gone may be taken over at once."""

from __future__ import annotations

import os
import socket
import time

from postroom.worker.lease import dead_here


def test_a_killed_process_not_yet_reaped_counts_as_gone() -> None:
    """A child that has exited but is not reaped (a zombie, as a killed worker's pool
    process is until init reaps it) still answers ``kill(pid, 0)``; its lease is dead."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while not open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] == b"Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert dead_here(f"{socket.gethostname()}:{pid}")
    finally:
        os.waitpid(pid, 0)
    assert dead_here(f"{socket.gethostname()}:{pid}")
    assert not dead_here(f"{socket.gethostname()}:{os.getpid()}")
    assert not dead_here(f"another-host:{pid}")
