"""Start a throwaway single-node etcd in a Docker container for tests (testcontainers).

Used by the ``etcd`` fixture of tests/conftest.py::

    from virtlease_lab.etcdcontainer import docker_available, start_etcd_container

    container, endpoint = start_etcd_container()
    try:
        ...  # endpoint is "host:port", e.g. "127.0.0.1:32771"
    finally:
        container.stop()

The image defaults to ``$VIRTLEASE_ETCD_IMAGE`` or the official ``gcr.io/etcd-development/etcd``
image. Where no registry is reachable, build a local image first with
``deploy/etcd-image/build.sh`` and export ``VIRTLEASE_ETCD_IMAGE=virtlease/etcd:3.5.1-local``.
Where the Ryuk reaper image cannot be pulled, also export ``TESTCONTAINERS_RYUK_DISABLED=true``
(then containers are removed only by ``stop()``; leftovers carry the label
``virtlease.test=etcd``) and, when tests run on the Docker host itself,
``TESTCONTAINERS_CONNECTION_MODE=docker_host``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "CONTAINER_LABEL",
    "DEFAULT_ETCD_IMAGE",
    "ETCD_CLIENT_PORT",
    "EtcdContainerError",
    "docker_available",
    "start_etcd_container",
]

DEFAULT_ETCD_IMAGE = "gcr.io/etcd-development/etcd:v3.5.17"
"""Official image; 3.5.3+ is free of the 3.5.0-3.5.2 data-inconsistency bug."""

ETCD_CLIENT_PORT = 2379
CONTAINER_LABEL = {"virtlease.test": "etcd"}
"""Label on every container started here: ``docker ps -aq --filter label=virtlease.test=etcd``."""

_READY_TIMEOUT_S = 30.0


class EtcdContainerError(RuntimeError):
    """The etcd container could not be started or did not begin serving in time."""


def docker_available() -> bool:
    """Return True if a Docker engine answers a ping (honours ``DOCKER_HOST`` and friends)."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=5)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _etcd_command() -> str:
    """Command line of a single-member etcd listening on all interfaces inside the container."""
    args = [
        "/usr/local/bin/etcd",
        "--name=default",
        "--data-dir=/var/lib/etcd/default",
        f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
        f"--advertise-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=default=http://127.0.0.1:2380",
        "--initial-cluster-state=new",
        "--initial-cluster-token=virtlease-test",
        "--log-level=warn",
    ]
    return " ".join(args)


def _container_exited(container: DockerContainer) -> bool:
    """True if the container's process has already ended (best effort; False if unknown)."""
    try:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status in ("exited", "dead")
    except Exception:
        return False


def _wait_until_serving(container: DockerContainer, host: str, port: int, timeout: float) -> None:
    """Poll ``status()`` with python-etcd3 until the member answers, or raise TimeoutError.

    Fails early with RuntimeError if the container exits meanwhile (bad flags, unusable image).
    """
    import etcd3

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if _container_exited(container):
            raise RuntimeError("container exited before etcd served")
        client = None
        try:
            client = etcd3.client(host=host, port=port, timeout=2)
            status = client.status()
            if status.leader is not None:
                return
            last_error = RuntimeError("no leader yet")
        except Exception as exc:  # grpc errors, connection refused while the port proxy starts, ...
            last_error = exc
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
        time.sleep(0.2)
    raise TimeoutError(f"etcd at {host}:{port} not serving after {timeout:.0f}s: {last_error!r}")


def start_etcd_container(image: str | None = None) -> tuple[DockerContainer, str]:
    """Start a single-node etcd container and wait until it serves client requests.

    Args:
        image: Docker image containing ``/usr/local/bin/etcd``; defaults to
            ``$VIRTLEASE_ETCD_IMAGE`` or :data:`DEFAULT_ETCD_IMAGE`.

    Returns:
        ``(container, endpoint)``: the started testcontainers ``DockerContainer`` (the caller must
        call ``container.stop()``) and the ``"host:port"`` of the mapped client port.

    Raises:
        EtcdContainerError: the container failed to start or etcd did not serve within 30 s
            (the container is removed, its log is included in the message).
    """
    from testcontainers.core.container import DockerContainer

    image = image or os.environ.get("VIRTLEASE_ETCD_IMAGE", DEFAULT_ETCD_IMAGE)
    container = (
        DockerContainer(image)
        .with_command(_etcd_command())
        .with_exposed_ports(ETCD_CLIENT_PORT)
        .with_kwargs(labels=dict(CONTAINER_LABEL))
    )
    try:
        container.start()
        host = container.get_container_host_ip()
        if host == "localhost":
            host = "127.0.0.1"  # the mapped port may be bound on IPv4 only
        port = int(container.get_exposed_port(ETCD_CLIENT_PORT))
        _wait_until_serving(container, host, port, _READY_TIMEOUT_S)
    except Exception as exc:
        logs = _container_logs(container)
        try:
            container.stop()
        except Exception:
            pass
        raise EtcdContainerError(f"etcd container from image {image!r} did not start: {exc}{logs}") from exc
    return container, f"{host}:{port}"


def _container_logs(container: DockerContainer, tail: int = 40) -> str:
    """Last lines of the container's output, formatted for an error message (best effort)."""
    try:
        stdout, stderr = container.get_logs()
    except Exception:
        return ""
    text = (stdout or b"").decode(errors="replace") + (stderr or b"").decode(errors="replace")
    lines = text.strip().splitlines()[-tail:]
    return "\n--- container log ---\n" + "\n".join(lines) if lines else ""
