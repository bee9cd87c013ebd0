"""Ray's own cluster launcher, from `ray up` to `ray down`, against machines built on this one.

Run as PID 1 of private PID, network and mount namespaces (see ``test_launcher.py``)::

    unshare -p -f -n -m --mount-proc python tests/launcher.py WORK

WORK holds a wheelhouse of build tools (``wheelhouse/``) and gets ``out.json``, what the
scenario saw, which the test checks.

The laptop is this namespace: it runs `ray up`, `ray dashboard`, `ray job ...`, `vae-study
results` and `report`, as a user's machine would, with a private /tmp and home, on a bridge
(10.77.0.1) with moto's S3 server on it. Each machine is an sshd, the child of PID 1 of its own
PID, mount and network namespaces, on that bridge, with:

- its own home (``/run/node-home``, the ssh user's) and ``/tmp``, and neither the repository nor
  the laptop's or the other machines' files: `file_mounts` and `setup_commands` really run there,
  and its `ray stop` sees only its own processes;
- an image: Debian's python3.11 and a virtual environment, ``~/vae-study-env``, that holds every
  dependency but this project (an overlay of the test's own environment), as an image with
  preinstalled packages would; pip has no index (``PIP_NO_INDEX``) but build tools in a
  wheelhouse, and the bucket's endpoint and keys come from the machine's environment, as an
  instance profile's would.

The cluster config is made from the repository's ``cluster.yaml`` by ``vae-study cluster local``
after the one edit a user makes (the bucket), so every node runs exactly the commands that AWS
nodes run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENV_PREFIX = Path(sys.prefix)  # the test's virtual environment: the machines' image
WORK = Path("/run/work")  # WORK, bound here so that /tmp can be private
NODE_HOME = Path("/run/node-home")  # a machine's home, the same path on each, its own disk behind it
NODE_SYS = Path("/run/node-sys")  # a machine's sshd config and host key
WHEELHOUSE = Path("/run/wheelhouse")
NET = "10.77.0"
LAPTOP_IP = f"{NET}.1"
MACHINES = {"head": f"{NET}.2", "worker": f"{NET}.3"}
BUCKET_URI = "s3://studies/launched"
STUDY = "launch"
DASHBOARD = "http://127.0.0.1:8265"
# Small, and long enough per trial that a machine can be killed in the middle of one.
# ASHA persists a checkpoint at each rung (epochs 1, 2, 4, 8, 16), so a trial killed after its
# second one continues from epoch 2 or later.
STUDY_ARGS = ["--trials", "4", "--epochs", "16", "--max-train-images", "1200", "--grace-period", "1",
              "--reduction-factor", "2", "--max-failures", "3", "--no-refit", "--address", "auto"]


def sh(cmd: list[str], timeout: float = 600, **kw: Any) -> dict[str, Any]:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, str(exc.stdout or ""), str(exc.stderr or "") + f"\n(timed out after {timeout} s)"
    return {"cmd": " ".join(cmd[:4]), "rc": rc, "stdout": out[-8000:], "stderr": err[-8000:],
            "seconds": round(time.time() - t0, 1)}


def check(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


# --------------------------------------------------------------------------- the laptop

def laptop_setup(work: Path) -> dict[str, str]:
    """Private /run, /tmp and home, the bridge, and the environment the laptop's commands run in."""
    check(["ip", "link", "set", "lo", "up"])
    check(["mount", "-t", "tmpfs", "tmpfs", "/run"])
    for d in (WORK, NODE_HOME, NODE_SYS, WHEELHOUSE, Path("/run/sshd"), Path("/run/netns")):
        d.mkdir(mode=0o755)
    check(["mount", "--bind", str(work), str(WORK)])
    _private_tmp(keep=[REPO, ENV_PREFIX])
    check(["mount", "--bind", str(WORK / "wheelhouse"), str(WHEELHOUSE)])
    home = WORK / "laptop"
    (home / ".ssh").mkdir(parents=True)
    _passwd_with_home(home, WORK / "laptop.passwd")
    check(["mount", "--bind", str(WORK / "laptop.passwd"), "/etc/passwd"])
    check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")])
    check(["ip", "link", "add", "br0", "type", "bridge"])
    check(["ip", "addr", "add", f"{LAPTOP_IP}/24", "dev", "br0"])
    check(["ip", "link", "set", "br0", "up"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "PYTEST", "VAE_STUDY_STORAGE"))}
    from vae.data import cache_dir

    env.update(HOME=str(home), PATH=f"{ENV_PREFIX / 'bin'}:{env['PATH']}", RAY_USAGE_STATS_ENABLED="0",
               VAE_STUDY_CACHE=str(cache_dir()), TMPDIR="/tmp")
    return env


def _private_tmp(keep: list[Path]) -> None:
    """A fresh /tmp (Ray's cluster state and ssh sockets stay in it), but for the folders in
    ``keep`` that live there (a checkout or environment under /tmp, as in some CI runs)."""
    inside = [p for p in keep if Path("/tmp") in p.parents]
    for i, p in enumerate(inside):
        (Path("/run/keep") / str(i)).mkdir(parents=True)
        check(["mount", "--bind", str(p), f"/run/keep/{i}"])
    check(["mount", "-t", "tmpfs", "tmpfs", "/tmp"])
    for i, p in enumerate(inside):
        p.mkdir(parents=True, exist_ok=True)
        check(["mount", "--bind", f"/run/keep/{i}", str(p)])


def _passwd_with_home(home: Path, out: Path) -> None:
    lines = Path("/etc/passwd").read_text().splitlines()
    out.write_text("\n".join(re.sub(r"^(root:[^:]*:0:0:[^:]*:)[^:]*:", rf"\g<1>{home}:", ln) for ln in lines) + "\n")


# --------------------------------------------------------------------------- the machines

class Notes(dict):
    """What the scenario saw, written out after every step (a run cut short still says how far it got)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        # once the laptop's /tmp is private, WORK is where the test's folder is seen
        path = WORK / self.path.name if os.path.ismount(WORK) else self.path
        path.write_text(json.dumps(self, indent=1, default=str))


class Machine:
    """An sshd in its own PID, mount and network namespaces, reachable at ``ip`` on the bridge."""

    def __init__(self, name: str, ip: str, setenv: dict[str, str]) -> None:
        self.name, self.ip, self.setenv = name, ip, setenv
        self.netns = f"vs-{name}"
        self.boots = 0
        self.proc: subprocess.Popen | None = None
        check(["ip", "netns", "add", self.netns])
        check(["ip", "link", "add", f"v-{name}", "type", "veth", "peer", "name", "eth0", "netns", self.netns])
        check(["ip", "link", "set", f"v-{name}", "master", "br0", "up"])
        check(["ip", "-n", self.netns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        check(["ip", "-n", self.netns, "link", "set", "eth0", "up"])
        check(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        check(["ip", "-n", self.netns, "route", "add", "default", "via", LAPTOP_IP])

    @property
    def root(self) -> Path:
        return WORK / "machines" / self.name

    def boot(self) -> None:
        """Start the machine. The first boot gets a new disk: an empty home but for the image;
        a later one (a reboot) keeps it, and starts with no process and an empty /tmp."""
        self.boots += 1
        root = self.root
        if self.boots > 1:
            self._sshd(root)
            return
        for d in ("home/.ssh", "sys", "env-upper", "env-work"):
            (root / d).mkdir(parents=True)
        for skel in Path("/etc/skel").iterdir():  # the shell start-up files of a fresh account
            (root / "home" / skel.name).write_bytes(skel.read_bytes())
        pub = (WORK / "laptop" / ".ssh" / "id_ed25519.pub").read_text()
        (root / "home" / ".ssh" / "authorized_keys").write_text(pub)
        check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "sys" / "host_key")])
        _passwd_with_home(NODE_HOME, root / "sys" / "passwd")
        setenv = " ".join(f"{k}={v}" for k, v in self.setenv.items())
        (root / "sys" / "sshd_config").write_text(
            f"Port 22\nListenAddress {self.ip}\nHostKey {NODE_SYS}/host_key\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile none\nAuthorizedKeysFile .ssh/authorized_keys\nSetEnv {setenv}\nLogLevel ERROR\n")
        self._sshd(root)

    def _sshd(self, root: Path) -> None:
        log = open(root / "sshd.log", "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "-p", "-f", "-m", "--mount-proc",
             sys.executable, str(Path(__file__).resolve()), "--machine", str(root), str(self.boots)],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and not _port_open(self.ip, 22):
            time.sleep(0.2)

    def pid1(self) -> int | None:
        """This machine's PID 1 (our init), as the laptop sees it."""
        if self.proc is None:
            return None
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return int(kids.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def pid_ns(self) -> str | None:
        pid = self.pid1()
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") if pid else None
        except OSError:
            return None

    def kill(self) -> None:
        """The machine is gone at once (a spot reclaim): its PID 1 dies, and with it every process."""
        pid = self.pid1()
        if pid:
            os.kill(pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=30)


def machine_main(root: Path, boot: int) -> int:
    """A machine's PID 1: its own disk and /tmp, then sshd, reaping every orphan."""
    check(["mount", "--bind", str(root / "sys" / "passwd"), "/etc/passwd"])
    check(["mount", "--bind", str(root / "home"), str(NODE_HOME)])
    check(["mount", "--bind", str(root / "sys"), str(NODE_SYS)])
    env_dir = NODE_HOME / "vae-study-env"
    env_dir.mkdir(exist_ok=True)  # the image's environment: the test's, under the machine's own writes
    check(["mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={ENV_PREFIX},upperdir={root / 'env-upper'},workdir={root / 'env-work'}", str(env_dir)])
    if boot == 1:
        _image_env(env_dir)
    check(["mount", "-t", "tmpfs", "tmpfs", "/tmp"])
    if Path("/tmp") not in REPO.parents:  # (a checkout under /tmp is hidden already)
        check(["mount", "-t", "tmpfs", "tmpfs", str(REPO)])  # the repository is the laptop's, not the machine's
    check(["mount", "-t", "tmpfs", "tmpfs", str(WORK)])  # nor are the laptop's and the other machines' files
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(NODE_SYS / "sshd_config")])
    while True:
        pid, status = os.wait()
        if pid == sshd.pid:
            return os.waitstatus_to_exitcode(status)


def _image_env(env_dir: Path) -> None:
    """The test's environment as an image's: without this project, its scripts run its own Python."""
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    for p in list(site.glob("__editable__*vae_study*")) + list(site.glob("vae_study-*.dist-info")):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    old, new = f"#!{ENV_PREFIX}/bin/python".encode(), f"#!{env_dir}/bin/python".encode()
    for script in (env_dir / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if data.startswith(old):
            tmp = script.with_name(script.name + ".new")
            tmp.write_bytes(new + data[len(old):])
            tmp.chmod(0o755)
            os.replace(tmp, script)
    (env_dir / "bin" / "vae-study").unlink(missing_ok=True)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ray_processes(machines: dict[str, Machine]) -> dict[str, list[str]]:
    """The Ray processes in each machine's PID namespace."""
    namespaces = {m.pid_ns(): name for name, m in machines.items() if m.pid_ns()}
    found: dict[str, list[str]] = {name: [] for name in machines}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ns = os.readlink(proc / "ns" / "pid")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if ns in namespaces and cmd and _is_ray(cmd):
            found[namespaces[ns]].append(cmd[:160])
    return found


def _is_ray(cmd: str) -> bool:
    return cmd.startswith("ray::") or any(s in cmd for s in ("/ray/", "raylet", "gcs_server", "ray start"))


# --------------------------------------------------------------------------- the scenario

def run_scenario(out: Notes, work: Path) -> None:
    from s3 import SECRET, s3_server

    laptop = laptop_setup(work)
    with s3_server(host=LAPTOP_IP) as s3_env:
        laptop.update(s3_env)
        setenv = {**s3_env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE), "RAY_USAGE_STATS_ENABLED": "0",
                  "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        machines = {name: Machine(name, ip, setenv) for name, ip in MACHINES.items()}
        for m in machines.values():
            m.boot()
        out["machines_up"] = {name: _port_open(m.ip, 22) for name, m in machines.items()}
        if not all(out["machines_up"].values()):
            for m in machines.values():
                out[f"sshd_log_{m.name}"] = (m.root / "sshd.log").read_text()[-3000:]
            return

        def ray(*args: str, timeout: float = 900) -> dict[str, Any]:
            return sh(["ray", *args], timeout=timeout, env=laptop, cwd=REPO)

        # Ray 2.60's autoscaler v2 never launches the workers of a `local` provider whose head
        # is another machine (its state starts empty there); v1 does. `vae-study cluster local`
        # says so; AWS keeps v2 (node-type priority needs it).
        laptop["RAY_UP_enable_autoscaler_v2"] = "0"

        def cli(*args: str, timeout: float = 600) -> dict[str, Any]:
            return sh(["vae-study", *args], timeout=timeout, env=laptop, cwd=REPO)

        # What a user does: name the bucket in cluster.yaml, derive the on-premises config.
        edited = WORK / "cluster.yaml"
        text = (REPO / "cluster.yaml").read_text().replace("s3://YOUR-BUCKET/studies", BUCKET_URI)
        edited.write_text(text)
        config = WORK / "laptop" / "cluster-local.yaml"
        out["config"] = cli("cluster", "local", "--config", str(edited), "--head-ip", MACHINES["head"],
                            "--worker-ips", MACHINES["worker"], "--ssh-user", "root",
                            "--ssh-key", str(WORK / "laptop" / ".ssh" / "id_ed25519"), "--out", str(config))
        if out["config"]["rc"] != 0:
            return
        out["up"] = ray("up", "-y", str(config))
        if out["up"]["rc"] != 0:
            return
        tunnel = subprocess.Popen(["ray", "dashboard", str(config)], env=laptop, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out["tunnel"] = _wait(lambda: _port_open("127.0.0.1", 8265), 120)
            out["nodes_up"] = _wait(lambda: len(alive_nodes(laptop)) >= 2, 300)
            out["nodes"] = alive_nodes(laptop)
            submit = ray("job", "submit", "--address", DASHBOARD, "--no-wait", "--", "vae-study", "run",
                         "--name", STUDY, *STUDY_ARGS, timeout=120)
            out["submit"] = submit
            m = re.search(r"(raysubmit_\w+)", submit["stdout"] + submit["stderr"])
            if submit["rc"] != 0 or not m:
                return
            job = m.group(1)
            out["job"] = job
            # The worker machine is lost once a trial has saved a checkpoint: every process at
            # once, as in a spot reclaim or a power cut. It comes back (same address and disk);
            # the head's autoscaler, which lost its heartbeat, restarts Ray there by itself.
            # A trial that still runs (no trials row yet) must hold a checkpoint, or the kill
            # may hit only trials ASHA is about to stop, or ones that have none to continue from.
            out["checkpointed"] = _wait(lambda: any(e >= 1 for e in _running_checkpoints().values()), 600)
            out["checkpoints_at_kill"] = _running_checkpoints()
            out["killed_at"] = time.time()
            machines["worker"].kill()
            out["gone"] = _wait(lambda: len(alive_nodes(laptop)) == 1, 120)
            machines["worker"].boot()
            out["rejoined"] = _wait(lambda: len(alive_nodes(laptop)) >= 2, 600)
            out["nodes_after"] = alive_nodes(laptop, everyone=True)
            out["finished"] = _wait(lambda: _job_status(laptop, job) in ("SUCCEEDED", "FAILED", "STOPPED"), 1200)
            out["status"] = _job_status(laptop, job)
            out["logs"] = ray("job", "logs", job, "--address", DASHBOARD, timeout=120)
            out["attach_env"] = ray("exec", str(config), "echo storage=$VAE_STUDY_STORAGE; which vae-study")
        finally:
            tunnel.terminate()
        # From the laptop, straight from the bucket.
        uri = f"{BUCKET_URI}/{STUDY}"
        out["results"] = cli("results", uri, "--format", "json", "--columns",
                             "trial_id,status,node,hostname,attempts,epochs_run,restored_from_epoch,started_at")
        out["report"] = cli("report", uri, "--out", str(WORK / "report"), "--tsne-points", "200",
                            "--gap-images", "50", "--decoder-steps", "5")
        out["report_files"] = sorted(p.name for p in (WORK / "report").glob("*")) if (WORK / "report").is_dir() else []
        out["secret_in_bucket"] = _secret_in_bucket(SECRET)
        # `ray down` stops Ray on the head. A worker's raylet leaves once its head is gone; what
        # Ray leaves behind there, `ray stop` on the worker ends (the README's on-premises note).
        out["down"] = ray("down", "-y", str(config))
        out["left_after_down"] = ray_processes(machines)
        out["raylets_gone"] = _wait(lambda: not any("raylet" in c for cs in ray_processes(machines).values()
                                                    for c in cs), 180)
        out["left_by_ray_down"] = ray_processes(machines)
        key = str(WORK / "laptop" / ".ssh" / "id_ed25519")
        out["worker_stop"] = sh(["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                 f"root@{MACHINES['worker']}", "ray stop"], env=laptop, timeout=120)
        out["stopped"] = _wait(lambda: not any(ray_processes(machines).values()), 60)
        out["left"] = ray_processes(machines)
        for m in machines.values():
            out[f"sshd_log_{m.name}"] = (m.root / "sshd.log").read_text()[-3000:]


def alive_nodes(env: dict[str, str], everyone: bool = False) -> list[dict[str, Any]]:
    """Ray's nodes through the forwarded dashboard, as `ray list nodes` shows them."""
    p = subprocess.run(["ray", "list", "nodes", "--address", DASHBOARD, "--format", "json", "--detail"],
                       capture_output=True, text=True, env=env, timeout=60)
    try:
        nodes = json.loads(p.stdout)
    except ValueError:
        return []
    keep = ("node_id", "node_ip", "state", "is_head_node", "resources_total", "start_time_ms")
    return [{k: n.get(k) for k in keep} for n in nodes if everyone or n.get("state") == "ALIVE"]


def _job_status(env: dict[str, str], job: str) -> str:
    p = subprocess.run(["ray", "job", "status", job, "--address", DASHBOARD], capture_output=True, text=True,
                       env=env, timeout=60)
    m = re.search(r"status: (\w+)", p.stdout) or re.search(r"Job '\S+' (\w+)", p.stdout)
    return m.group(1).upper() if m else "UNKNOWN"


def _checkpoints(prefix: str, index: int = 0) -> int:
    """Trials' checkpoints in the bucket with this index (0: a trial's first)."""
    from s3 import bucket_keys

    return sum(f"/checkpoint_{index:06d}/" in k for k in bucket_keys(f"launched/{prefix}"))


def _running_checkpoints() -> dict[str, int]:
    """Trials without a trials row yet, and the epoch of the newest checkpoint the driver has
    taken from each (0: none yet). A checkpoint folder in the bucket is not enough: a trial
    uploads it before it reports it, and Tune can continue a trial only from a checkpoint it was
    told of (a kill in between restarts the trial from the one before: seen once in CI). The
    driver writes a trial's epoch rows when it takes a result, and checkpoints come at ASHA's
    rungs (epochs 1, 2, 4, 8 here), so the newest taken is the last rung at or below the newest
    epoch in the trial's rows, among the checkpoint folders in the bucket."""
    import io

    import pyarrow.parquet as pq

    from s3 import bucket_keys, get_object

    keys = bucket_keys(f"launched/{STUDY}/")
    done = {m.group(1) for k in keys if (m := re.search(r"/trials/(\w+)\.parquet$", k))}
    running = {m.group(1) for k in keys if (m := re.search(r"/trial_(\w+)/checkpoint_\d+/", k))} - done
    held: dict[str, int] = {}
    for tid in running:
        key = f"launched/{STUDY}/epochs/{tid}.parquet"
        try:
            epochs = pq.read_table(io.BytesIO(get_object(key))).column("epoch").to_pylist() if key in keys else []
        except Exception:  # noqa: BLE001 - rewritten while read: next poll
            epochs = []
        newest = max(epochs, default=0)
        held[tid] = 2 ** (newest.bit_length() - 1) if newest else 0  # the last rung <= newest
    return held


def _secret_in_bucket(secret: str) -> list[str]:
    from s3 import bucket_keys, get_object

    return [k for k in bucket_keys("launched/") if secret.encode() in get_object(k)]


def _wait(ok: Any, timeout: float) -> float | None:
    """Seconds until ``ok()`` held, or None if it never did."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if ok():
                return round(time.time() - t0, 1)
        except Exception:  # noqa: BLE001 - a probe that fails is a probe that has not succeeded yet
            pass
        time.sleep(2)
    return None


def main() -> int:
    if sys.argv[1] == "--machine":
        return machine_main(Path(sys.argv[2]), int(sys.argv[3]))
    from nodes import reap_as_pid1

    code = reap_as_pid1([sys.executable, *sys.argv])
    if code is not None:
        return code
    sys.path[:0] = [str(REPO), str(HERE)]
    work = Path(sys.argv[1])
    out = Notes(work / "out.json")
    try:
        run_scenario(out, work)
    except BaseException as exc:
        out["crashed"] = repr(exc)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
