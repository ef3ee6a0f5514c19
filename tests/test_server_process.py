"""The one server manager (``r1_mm.rollout.servers.ServerProcess``) on a fake server: a Python one-liner
that serves HTTP on a free port. Ready, exit during start-up (error names the log and its last lines),
the readiness deadline (the process is stopped), restart (same log, appended), stop ending the whole
process group, and the server dying with the process that started it (even by SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from r1_mm.rollout.servers import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent

# serves 200 on every GET; prints a line first; with a pid file, starts a child in its own group first
FAKE_SERVER = """
import http.server, subprocess, sys
if len(sys.argv) > 2:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
print("fake server starting", flush=True)
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


class FakeServer(ServerProcess):
    name = "fake server"

    def __init__(self, log_path: Path, command: list[str] | None = None, port: int | None = None, **kw):
        super().__init__(log_path, **kw)
        self.port = port or free_port()
        self._command = command or [sys.executable, "-c", FAKE_SERVER, str(self.port)]

    def command(self) -> list[str]:
        return self._command

    def probe(self) -> bool:
        return httpx.get(f"http://127.0.0.1:{self.port}/", timeout=2).status_code == 200


def gone(pid: int, within_s: float = 10.0) -> bool:
    """Has process ``pid`` ended (no such process, or a zombie nobody reaped yet)?"""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_ready_then_stopped_by_the_context_manager(tmp_path):
    with FakeServer(tmp_path / "server.log", startup_timeout_s=60) as server:
        assert server.alive()
        pid = server.process.pid
        assert httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5).text == "ok"
    assert server.process is None and not server.alive() and gone(pid)
    assert "fake server starting" in (tmp_path / "server.log").read_text()


def test_exit_during_start_up_names_the_code_and_the_log(tmp_path):
    log = tmp_path / "server.log"
    server = FakeServer(log, [sys.executable, "-c", "print('cannot load the model', flush=True); raise SystemExit(3)"])
    with pytest.raises(RuntimeError) as err:
        server.start(60)
    message = str(err.value)
    assert message.startswith(f"fake server exited with code 3 during start-up; log: {log}")
    assert "cannot load the model" in message  # the log's last lines, not only its path


def test_the_deadline_stops_the_server_and_names_the_log(tmp_path):
    log = tmp_path / "server.log"
    server = FakeServer(log, [sys.executable, "-c", "import time; time.sleep(600)"])
    with pytest.raises(TimeoutError, match=rf"^fake server not ready after 2 s; log: {log}$"):
        server.start(timeout_s=2)
    assert server.process is None  # stopped, not left running


def test_start_without_waiting_then_restart_appends_to_the_log(tmp_path):
    server = FakeServer(tmp_path / "server.log", startup_timeout_s=60, log_mode="a")
    try:
        server.start(wait=False).wait_ready()
        first = server.process.pid
        server.restart()
        assert server.alive() and server.process.pid != first and gone(first)
        assert (tmp_path / "server.log").read_text().count("fake server starting") == 2
    finally:
        server.stop()


def test_stop_ends_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    port = free_port()
    server = FakeServer(tmp_path / "server.log", [sys.executable, "-c", FAKE_SERVER, str(port), str(pid_file)],
                        port=port, startup_timeout_s=60)
    server.start()
    child = int(pid_file.read_text())
    assert os.getpgid(child) == server.process.pid != os.getpgid(os.getpid())  # its own session and group
    leader = server.process.pid
    server.stop()
    assert gone(leader) and gone(child)


def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    """The starter is SIGKILLed (no atexit, no cleanup): Linux still ends the server (PR_SET_PDEATHSIG)."""
    port = free_port()
    starter = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_server_process import FakeServer
from pathlib import Path
server = FakeServer(Path({str(tmp_path / 'server.log')!r}), port={port}, startup_timeout_s=60).start()
print(server.process.pid, flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        server_pid = int(proc.stdout.readline())
        assert not gone(server_pid, within_s=0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert gone(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
