"""A throwaway PostgreSQL server from the system's packages, for the search tests and benchmark:
`initdb` and `pg_ctl` into a temporary folder, on a loopback port, trust authentication. initdb
refuses root, so as root the server runs as the `postgres` user the Debian package creates."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class Postgres:
    """A throwaway PostgreSQL cluster on a loopback port, with trust authentication."""

    def __init__(self) -> None:
        found = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))), None)
        if found is None:
            raise RuntimeError("PostgreSQL is not installed: run the README's set-up (it apt-installs postgresql)")
        self.bin = Path(found).parent
        self.root = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql://slmops@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.root, "postgres")
        self._as_owner("initdb", "-D", str(self.root / "data"), "--auth=trust", "-U", "slmops", "--no-sync")
        self.start()

    def _as_owner(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_owner("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "-o",
                       f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off", "start")

    def stop(self) -> None:
        self._as_owner("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    def database(self, name: str) -> str:
        """A new, empty database on this server; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
