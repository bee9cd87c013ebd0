"""A real PostgreSQL server for the tests, from the binaries the ``pgserver`` wheel ships.

It listens on 127.0.0.1 at a free port, with password (SCRAM) authentication, so the tests
see what a user's database asks of the tool: a user, a password that must come from the
environment or a ``.pgpass`` file, and TCP. PostgreSQL refuses to run as root; as root the
server runs as ``nobody`` (no user is added to this machine: the launcher tests bind-mount
their own /etc/passwd over this machine's, and a useradd under them replaces the file)."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

USER = "vae"
DATABASE = "vae"
SYSTEM_USER = "nobody"


def bin_dir() -> Path:
    from pgserver._commands import POSTGRES_BIN_PATH  # the wheel's own binaries

    return Path(POSTGRES_BIN_PATH)


@dataclass
class Server:
    data: Path
    port: int
    password: str
    run_as: int | None

    @property
    def url(self) -> str:
        """The URL a user gives the tool: no password in it."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def socket_dir(self) -> Path:
        """The folder of its Unix-domain socket (``.s.PGSQL.<port>``)."""
        return self.data.parent / "sock"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir() / args[0]), *args[1:]], capture_output=True, text=True,
                              user=self.run_as, group=self.run_as and pwd.getpwuid(self.run_as).pw_gid,
                              extra_groups=[] if self.run_as else None, check=check, timeout=120, cwd="/")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.data.parent, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(password: str = "s3cret-pg-Pa55") -> Server:
    """A server in a fresh folder under /tmp (pytest's own are private to root; the server's
    user must reach its data)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vae-pg-"))
    run_as = None
    if os.geteuid() == 0:
        run_as = pwd.getpwnam(SYSTEM_USER).pw_uid
        for p in [*bin_dir().parents][:4]:  # the server user must reach its binaries
            p.chmod(p.stat().st_mode | 0o005)
    root.chmod(0o777)
    data = root / "pgdata"
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o644)
    server = Server(data, _free_port(), password, run_as)
    server._run("initdb", "-D", str(data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                "-E", "UTF8", "--no-sync")
    pwfile.unlink()
    sockets = root / "sock"
    sockets.mkdir()
    sockets.chmod(0o777)
    server._run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                f"-h 127.0.0.1 -p {server.port} -k {sockets} -c fsync=off", "start")
    env = {**os.environ, "PGPASSWORD": password}
    subprocess.run([str(bin_dir() / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", USER, DATABASE],
                   check=True, capture_output=True, env=env, timeout=60)
    return server


def available() -> bool:
    try:
        if os.geteuid() == 0:
            pwd.getpwnam(SYSTEM_USER)
        return (bin_dir() / "postgres").is_file()
    except (ImportError, KeyError):
        return False
