"""A real systemd host for the Ansible tests: Debian 12 from debootstrap, booted
with systemd-nspawn, reached over SSH on a loopback port.

The debootstrap root is built once and cached (keyed by its recipe), then each
host boots from an overlay on it, so a test host costs about a second and the
cache is never written to. The container shares the machine's kernel and
network: its sshd listens on 127.0.0.1 at a free port, and it reaches the
InfluxDB the tests start on loopback.

    python -m tests.systemd_host build     # build (or check) the cached root
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

CACHE = Path(os.environ.get("SONDE_TEST_HOST_CACHE", "/var/cache/sonde-tests"))
MIRROR = "http://deb.debian.org/debian"
RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3"],
}
# The container keeps what the agent needs on top of nspawn's default set (which
# has CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH but not these), and
# bpf()/perf_event_open() are let through nspawn's syscall filter.
CAPABILITIES = "CAP_BPF,CAP_PERFMON"
SYSCALLS = "bpf perf_event_open"
# apt's archives, shared by the test hosts (which run one at a time), so the role
# runs download bcc, LLVM and the headers once, not once per host.
SHARED_CACHES = {"apt-archives": "/var/cache/apt/archives"}
# This machine reaches PyPI through a TLS proxy its own CA bundle trusts; the
# test host gets the same trust for pip, as a fleet behind such a proxy would.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def root_dir() -> Path:
    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / f"{RECIPE['suite']}-{key}"


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "ssh", "scp", "ssh-keygen")
            if shutil.which(t) is None]


def ensure_root(log=print) -> Path:
    """The cached root, built if absent. Safe against concurrent builders."""
    root = root_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".sonde-complete").exists():
            return root
        tmp = root.with_name(root.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"building the test host root {root} with debootstrap (about 40 s)")
        t0 = time.monotonic()
        subprocess.run(["debootstrap", f"--variant={RECIPE['variant']}", f"--include={','.join(RECIPE['include'])}",
                        RECIPE["suite"], str(tmp), MIRROR], check=True, stdout=subprocess.DEVNULL)
        # Every host boots its own copy-on-write layer; these are per-host.
        for f in ("etc/hostname", "etc/machine-id"):
            (tmp / f).unlink(missing_ok=True)
        for key in (tmp / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (tmp / ".sonde-complete").write_text(json.dumps({**RECIPE, "seconds": round(time.monotonic() - t0)}))
        tmp.rename(root)
        return root


def _run(*cmd: str, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


class SystemdHost:
    """One booted container (`with SystemdHost(...) as host:` boots it and powers it
    off). `ssh(cmd)` runs a shell command in it as root."""

    def __init__(self, name: str, base: Path, workdir: Path, port: int):
        self.name, self.base, self.port = name, base, port
        self.workdir = workdir
        self.merged = workdir / "root"
        self.key = workdir / "id_ed25519"
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None
        self._mounted = False

    # -- lifecycle -----------------------------------------------------------
    def start(self, timeout: float = 60) -> "SystemdHost":
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.base},upperdir={upper},workdir={work}", str(self.merged))
        self._mounted = True
        self._prepare()
        binds = []
        for name, inside in SHARED_CACHES.items():
            (CACHE / name / "partial").mkdir(parents=True, exist_ok=True)
            binds.append(f"--bind={CACHE / name}:{inside}")
        log = open(self.workdir / "nspawn.log", "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-b", "-D", str(self.merged), f"--machine={self.name}", "--register=no",
             "--keep-unit", f"--capability={CAPABILITIES}", f"--system-call-filter={SYSCALLS}", *binds],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            # nspawn may briefly have a helper child; the leader is the child running systemd.
            self.leader = self._find_leader()
            if self.leader:
                state = self.nsenter("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded") and self.ssh("true", check=False).returncode == 0:
                    return self
            time.sleep(0.3)
        if not self.leader:
            raise RuntimeError(f"test host {self.name}: nspawn started no init; see {self.workdir}/nspawn.log")
        failed = self.nsenter("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout.split()[:1]
        raise RuntimeError(f"test host {self.name}: not up within {timeout:.0f} s (systemd: {state or 'no answer'}; "
                           f"failed units: {' '.join(failed) or 'none'})")

    def _prepare(self) -> None:
        r = self.merged
        (r / "etc/hostname").write_text(self.name + "\n")
        # A machine-id of its own; without one systemd runs first-boot presets,
        # which enable ssh.socket on port 22 instead of our sshd.
        (r / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        subprocess.run(["ssh-keygen", "-A", "-f", str(r)], check=True, capture_output=True)  # host keys
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        ssh_dir = r / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        (r / "etc/ssh/sshd_config.d/sonde-test.conf").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUseDNS no\n")
        if HOST_CA.exists():
            shutil.copy(HOST_CA, r / "etc/sonde-test-ca.pem")
            (r / "etc/pip.conf").write_text("[global]\ncert = /etc/sonde-test-ca.pem\n")

    def _find_leader(self) -> int | None:
        for pid in _run("ps", "--ppid", str(self.nspawn.pid), "-o", "pid=", check=False).stdout.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return None

    def _check_alive(self) -> None:
        if self.nspawn.poll() is not None:
            tail = (self.workdir / "nspawn.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"test host {self.name}: systemd-nspawn exited: {' | '.join(tail)}")

    def stop(self) -> None:
        try:
            if self.nspawn and self.nspawn.poll() is None:
                if self.leader:
                    self.nsenter("systemctl", "poweroff", check=False)
                try:
                    self.nspawn.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.nspawn.pid, 9)
                    self.nspawn.wait(timeout=10)
        finally:
            if self._mounted:
                _run("umount", "-l", str(self.merged), check=False)
                self._mounted = False
            # The host's own writes (packages, venv: about 500 MB); nspawn.log stays.
            for d in ("upper", "work"):
                shutil.rmtree(self.workdir / d, ignore_errors=True)

    def __enter__(self) -> "SystemdHost":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- access --------------------------------------------------------------
    def nsenter(self, *cmd: str, check=True, timeout=30) -> subprocess.CompletedProcess:
        return _run("nsenter", "-t", str(self.leader), "-a", *cmd, check=check, timeout=timeout)

    def ssh_args(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"]

    def ssh(self, command: str, check=True, timeout=60) -> subprocess.CompletedProcess:
        return _run("ssh", *self.ssh_args(), "-p", str(self.port), "root@127.0.0.1", command,
                    check=check, timeout=timeout)

    def put(self, local: Path, remote: str) -> None:
        _run("scp", "-q", *self.ssh_args(), "-P", str(self.port), str(local), f"root@127.0.0.1:{remote}")

    def inventory_vars(self) -> dict:
        return {"ansible_host": "127.0.0.1", "ansible_port": self.port, "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": " ".join(self.ssh_args()[2:])}


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m tests.systemd_host build")
    print(ensure_root())
