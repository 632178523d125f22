"""A throwaway single-node SLURM cluster for the launcher tests (Debian's ``slurm-wlm`` + ``munge``).

Everything lives in one temporary directory: a fresh munge key and socket, ``slurm.conf`` and
``cgroup.conf`` for this host, state, spool and logs; the daemons listen on free local ports. So
a cluster started here never touches a system munged/slurmctld, and stopping it removes nothing
but what it started. The client commands (``sbatch``, ``squeue``, ``srun`` inside the job) find
it through ``SLURM_CONF``, which :meth:`SlurmCluster.env` adds to an environment; sbatch exports
the submitter's environment to the job, so the job runs in the submitting Python environment.

    with SlurmCluster(tmp_dir) as cluster:
        subprocess.run([...], env=cluster.env())

Without the binaries (or not as root, which slurmd needs to start jobs) :func:`missing` names
what is absent; the tests skip on a developer machine and fail in CI (``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")
INSTALL = "apt-get install -y slurm-wlm munge"
PARTITION = "debug"
# the daemons live in sbin, which a non-login PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def missing() -> str | None:
    """Why a cluster cannot start here (one line), or None when it can."""
    absent = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SEARCH_PATH) is None]
    if absent:
        return f"SLURM/munge binaries not found: {', '.join(absent)} (install: {INSTALL})"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts the jobs)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_memory_mb() -> int:
    """MemTotal from /proc/meminfo, in MB, less a margin: slurmd drains a node that reports less
    memory than slurm.conf claims."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512
    raise RuntimeError("MemTotal missing from /proc/meminfo")


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, all under ``root`` (a fresh directory)."""

    def __init__(self, root: Path, cpus: int = 2, start_timeout: float = 60.0):
        self.root = Path(root)
        self.cpus = cpus
        self.start_timeout = start_timeout
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- configuration -------------------------------------------------------------------
    def slurm_conf(self) -> str:
        r = self.root
        lines = {
            "ClusterName": "transferlab", "SlurmctldHost": f"{self.host}(127.0.0.1)",
            "SlurmUser": "root", "SlurmdUser": "root",
            "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
            "AuthType": "auth/munge", "CredType": "cred/munge",
            # cred_expire (default 120 s) is also how long a requeued job waits before it may restart
            "AuthInfo": f"socket={self.socket},cred_expire=5",
            "StateSaveLocation": r / "state", "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid", "SlurmdPidFile": r / "slurmd.pid",
            "SlurmctldLogFile": r / "slurmctld.log", "SlurmdLogFile": r / "slurmd.log",
            # no cgroups: processes are tracked through /proc, tasks are not confined
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_CPU_Memory",
            "SchedulerType": "sched/backfill", "MpiDefault": "none", "ReturnToService": 2,
            # schedule every 2 s, not 60: a requeued job is started as soon as it is eligible
            "SchedulerParameters": "sched_interval=2,bf_interval=1",
            # seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (default 30)
            "KillWait": 2, "InactiveLimit": 0, "MinJobAge": 600, "SlurmdTimeout": 60, "MailProg": "/bin/true",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        return text + (
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={real_memory_mb()} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP\n")

    def write_config(self) -> None:
        for d in ("munge", "state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.conf.write_text(self.slurm_conf())
        # read only by the cgroup plugins, which the linuxproc/none choice above never loads
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            self.check("mungekey", "--create", f"--keyfile={key}")
        key.chmod(0o400)

    # ---- processes -----------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) pointed at this cluster."""
        env = dict(os.environ if base is None else base)
        env.update(SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)
        return env

    def check(self, *cmd: str, timeout: float = 30) -> str:
        """Run a command against this cluster; its stdout, or an error naming its output."""
        p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p.stdout

    def spawn(self, name: str, *cmd: str) -> None:
        # in the foreground the daemons also print what they log: their log files are enough
        self.procs[name] = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> SlurmCluster:
        self.write_config()
        m = self.root / "munge"
        # --force: munged refuses root and world-writable ancestors (/tmp) otherwise
        self.spawn("munged", "munged", "--foreground", "--force", f"--socket={self.socket}",
                   f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                   f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}")
        self.wait_for(self.socket.exists, "munged's socket")
        self.spawn("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self.spawn("slurmd", "slurmd", "-D", "-f", str(self.conf), "-N", self.host)
        self.wait_for(lambda: self.node_state() == "idle", f"node {self.host} idle in sinfo")
        return self

    def node_state(self) -> str:
        try:
            return self.check("sinfo", "-h", "-N", "-o", "%T", timeout=10).strip()
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""

    def wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {self.start_timeout:.0f} s"
                raise RuntimeError(f"local SLURM cluster: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        for p in (self.root / "slurmctld.log", self.root / "slurmd.log", self.root / "munge" / "munged.log"):
            if p.is_file():
                out.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-tail:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is still queued, then end the daemons this object started (by pid)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:  # slurmstepd outlives slurmd: jobs must end before the daemons do
                self.check("scancel", f"--user={os.getuid()}", timeout=10)
                deadline = time.monotonic() + 15
                while self.check("squeue", "-h", "-o", "%i", timeout=10).strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
