"""Debian's own kernels booted under QEMU (software emulation), so probes are proven
on the kernels a fleet runs, not only on the machine's own kernel.

Images are built once per kernel and cached under /var/cache/sonde-tests/kernels/:

    <kernel>/root/        a debootstrap'd bookworm root with the pinned kernel, its
                          headers, bcc and a venv holding Sonde's Python dependencies
    <kernel>/root.json    stage-1 stamp: kernel ABI, installed versions, input hash
    <kernel>/disk.img     ext4 image of root/ (mkfs.ext4 -d), plus this module's init
    <kernel>/vmlinuz, initrd.img, stamp.json   what a boot needs; stamp = stage-2 hash
    wheels-<hash>/        Sonde's Python dependencies as wheels (`pip wheel` on the host)
    apt-archives/         debs shared by the builds (debootstrap --cache-dir, chroot apt)

A changed recipe (packages, pins, requirements, init) changes a hash and rebuilds: the
root when its recipe changed, only the ext4 image when just the init changed. A file
lock keeps two processes from building at once; a second lock runs one VM at a time
(TCG with -smp 2 takes both cores).

A boot shares a fresh job folder (tag `job`, read-write) and the checkout (tag `src`,
read-only) over 9p; the init mounts them at /job and /src, runs /job/job.sh between
marker lines on the serial console (its output also goes to /job/output.log, its exit
code to /job/rc), and powers off. cgroup2 is mounted at /sys/fs/cgroup (the pure v2
layout of a systemd Debian 12 host; the machine itself has the hybrid layout).

    python -m tests.kernels.qemu build [KERNEL...]   build (or check) the cached images
    python -m tests.kernels.qemu run KERNEL 'CMD'     boot KERNEL and run CMD in /src
    python -m tests.kernels.qemu smoke [KERNEL...]    which always-on probes load
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SONDE_TEST_HOST_CACHE", "/var/cache/sonde-tests")) / "kernels"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
# Bump to force a rebuild of every root when something outside the recipe changed.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Kernel:
    name: str          # short id used in test ids and cache folders
    abi: str           # exact `uname -r`; the packages are linux-image-<abi>, linux-headers-<abi>
    origin: str        # the suite it comes from (informational; pins are by ABI name)
    backports: bool = False

    @property
    def packages(self) -> list[str]:
        return [f"linux-image-{self.abi}", f"linux-headers-{self.abi}"]


# Exact ABIs, pinned. Old ABIs leave the mirror when a new one arrives: a cached image
# keeps working; a fresh machine needs the pin moved (the build error names the
# current ABI).
KERNELS: dict[str, Kernel] = {
    "6.1": Kernel("6.1", "6.1.0-56-amd64", "bookworm-security (6.1.192-2), Debian 12's stock kernel"),
    "6.12": Kernel("6.12", "6.12.95+deb12-amd64", "bookworm-backports (6.12.95-1~bpo12+1)", backports=True),
}

# What the guest needs besides the kernel: bcc and a venv for Sonde, the tools the
# tests drive (ip/tc, nft, ps; dd, losetup and taskset come with minbase), modprobe for
# 9p, and the servers the agent tests write to (conftest's `influx` and `victoria`).
BASE_PACKAGES = ["python3-bpfcc", "python3-venv", "iproute2", "kmod", "nftables", "procps",
                 "influxdb", "victoria-metrics"]
GUEST_VENV = "/opt/sonde-venv"
# Python dependencies the guest does not need (it never runs the Ansible role).
SKIP_REQUIREMENTS = ("ansible-core", "ansible-lint")

INIT = r"""#!/bin/sh
# Sonde kernel-matrix init (PID 1): mount what the probes need, run /job/job.sh
# between marker lines on the console, power off. Written by tests/kernels/qemu.py.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
export PATH HOME LANG
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# /tmp stays on the root disk (as on a Debian 12 host): loop devices backed by files in
# a test's tmp_path can then use direct I/O, which tmpfs lacks before 6.6.
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
modprobe 9pnet_virtio
modprobe 9p
mkdir -p /job /src
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /job
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro src /src
ip link set lo up
hostname sonde-guest
echo "@@SONDE-JOB-BEGIN@@ $(uname -r)"
( sh /job/job.sh; echo $? > /job/rc ) 2>&1 < /dev/null | tee /job/output.log
rc=$(cat /job/rc 2>/dev/null || echo 255)
echo "@@SONDE-JOB-END@@ rc=$rc"
sync
echo o > /proc/sysrq-trigger
sleep 60
"""
BEGIN, END = "@@SONDE-JOB-BEGIN@@", "@@SONDE-JOB-END@@"
# Extra kernel command line for every boot. mitigations=off halves the guest's syscall
# cost under TCG (no page-table switch per syscall: a 10,000-connection test took 38 s
# instead of 69 s on 6.1); the BPF verifier treats root the same either way.
KERNEL_ARGS = os.environ.get("SONDE_KERNEL_ARGS", "mitigations=off")

Log = Callable[[str], None]


class KernelImageError(RuntimeError):
    """A build step failed; the message says which and where its log is."""


# ---------------------------------------------------------------------------- recipe

def requirements() -> list[str]:
    """Sonde's runtime and test requirements from pyproject.toml, minus the Ansible ones."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("test", []))
    name = lambda r: re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower()  # noqa: E731
    return sorted(r for r in reqs if name(r) not in SKIP_REQUIREMENTS)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def root_recipe(kernel: Kernel) -> dict:
    return {"version": RECIPE_VERSION, "suite": SUITE, "mirror": MIRROR, "security": SECURITY_MIRROR,
            "base": BASE_PACKAGES, "kernel": kernel.packages, "backports": kernel.backports,
            "venv": GUEST_VENV, "requirements": requirements()}


def image_recipe(kernel: Kernel) -> dict:
    return {"root": _digest(root_recipe(kernel)), "init": INIT}


def kernel_dir(kernel: Kernel) -> Path:
    return CACHE / kernel.name


@dataclass
class Image:
    kernel: Kernel
    disk: Path
    vmlinuz: Path
    initrd: Path
    stamp: dict = field(default_factory=dict)


def missing_tools() -> list[str]:
    return [t for t in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "chroot", "mount")
            if shutil.which(t) is None]


def _stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cached_image(kernel: Kernel) -> Image | None:
    """The cached image if it is complete and built from the current recipe."""
    d = kernel_dir(kernel)
    stamp = _stamp(d / "stamp.json")
    img = Image(kernel, d / "disk.img", d / "vmlinuz", d / "initrd.img", stamp)
    if stamp.get("hash") == _digest(image_recipe(kernel)) and stamp.get("abi") == kernel.abi \
            and all(p.exists() for p in (img.disk, img.vmlinuz, img.initrd)):
        return img
    return None


@contextlib.contextmanager
def _flock(name: str, log: Log | None = None, what: str = ""):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"waiting for another process's {what} ({CACHE / name})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_image(kernel: Kernel, log: Log = print) -> Image:
    """The cached image for `kernel`, built (or rebuilt after a recipe change) if needed."""
    img = cached_image(kernel)
    if img:
        return img
    with _flock(".build-lock", log, "image build"):
        img = cached_image(kernel)  # another process may have built it while we waited
        if img:
            return img
        t0 = time.monotonic()
        root = _ensure_root(kernel, log)
        img = _make_image(kernel, root, log)
        log(f"[{kernel.name}] image ready in {time.monotonic() - t0:.0f} s: {img.disk}")
        return img


# ------------------------------------------------------------------------ the build

class _Builder:
    """Runs build commands with their output in <kernel>/build.log."""

    def __init__(self, kernel: Kernel, log: Log):
        self.kernel, self.log = kernel, log
        self.logfile = kernel_dir(kernel) / "build.log"

    def step(self, what: str) -> None:
        self.log(f"[{self.kernel.name}] {what}")
        with open(self.logfile, "a") as f:
            f.write(f"\n### {time.strftime('%H:%M:%S')} {what}\n")

    def run(self, *cmd: str, timeout: float = 1800, env: dict | None = None) -> str:
        with open(self.logfile, "a") as f:
            f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   stdin=subprocess.DEVNULL, timeout=timeout,
                                   env={**os.environ, **(env or {})})
            except subprocess.TimeoutExpired:
                raise KernelImageError(f"[{self.kernel.name}] `{' '.join(cmd[:4])} ...` took over {timeout:.0f} s; "
                                       f"see {self.logfile}")
            f.write(p.stdout)
        if p.returncode != 0:
            tail = " | ".join(p.stdout.strip().splitlines()[-3:])
            raise KernelImageError(f"[{self.kernel.name}] `{' '.join(cmd[:6])}` exited {p.returncode}: {tail} "
                                   f"(full log: {self.logfile})")
        return p.stdout

    def chroot(self, root: Path, *cmd: str, timeout: float = 1800) -> str:
        env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        return self.run("chroot", str(root), *cmd, timeout=timeout, env=env)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefix) or target == prefix.rstrip("/"):
            out.append(target)
    return out


def _umount_all(path: Path) -> None:
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount point (a bound /dev or /sys would be emptied)."""
    if not path.exists():
        return
    _umount_all(path)
    left = _mounts_under(path)
    if left:
        raise KernelImageError(f"refusing to delete {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path)


@contextlib.contextmanager
def _chroot_mounts(root: Path):
    """Fresh proc, sysfs and devpts instances (no bind of the host's /dev or /sys)."""
    try:
        for fstype, target, opts in (("proc", "proc", None), ("sysfs", "sys", None),
                                     ("devpts", "dev/pts", "newinstance,ptmxmode=0666")):
            (root / target).mkdir(parents=True, exist_ok=True)
            cmd = ["mount", "-t", fstype, fstype, str(root / target)] + (["-o", opts] if opts else [])
            subprocess.run(cmd, check=True, capture_output=True)
        yield
    finally:
        _umount_all(root)


def _wheels(b: _Builder) -> Path:
    """Sonde's Python dependencies as wheels for bookworm's Python 3.11, cached by requirement set."""
    reqs = requirements()
    d = CACHE / f"wheels-{_digest(reqs)}"
    if (d / "requirements.txt").exists():
        return d
    if sys.version_info[:2] != (3, 11):
        raise KernelImageError(f"the wheels are built with this interpreter, which must be bookworm's Python 3.11 "
                               f"like the guest's (this is {sys.version.split()[0]}): run the tests from Sonde's venv")
    b.step(f"pip wheel: {len(reqs)} requirements -> {d.name}")
    tmp = d.with_name(d.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    b.run(sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(tmp), *reqs,
          timeout=900)
    (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
    tmp.rename(d)
    return d


def _sources(kernel: Kernel) -> str:
    lines = [f"deb {MIRROR} {SUITE} main", f"deb {MIRROR} {SUITE}-updates main",
             f"deb {SECURITY_MIRROR} {SUITE}-security main"]
    if kernel.backports:
        lines.append(f"deb {MIRROR} {SUITE}-backports main")
    return "\n".join(lines) + "\n"


def _current_abi_hint(b: _Builder, root: Path, kernel: Kernel) -> str:
    flavour = "amd64"
    target = ["-t", f"{SUITE}-backports"] if kernel.backports else []
    try:
        out = b.chroot(root, "apt-cache", *target, "policy", f"linux-image-{flavour}", timeout=60)
        cand = re.search(r"Candidate:\s*(\S+)", out)
        dep = b.chroot(root, "apt-cache", *target, "depends", f"linux-image-{flavour}", timeout=60)
        abi = re.search(r"Depends:\s*linux-image-(\S+)", dep)
        return f"; the mirror's current linux-image-{flavour} is {cand and cand.group(1)} -> " \
               f"linux-image-{abi and abi.group(1)}: update KERNELS in {Path(__file__).relative_to(REPO)}"
    except KernelImageError:
        return ""


def _ensure_root(kernel: Kernel, log: Log) -> Path:
    d = kernel_dir(kernel)
    d.mkdir(parents=True, exist_ok=True)
    root, stamp_path = d / "root", d / "root.json"
    want = _digest(root_recipe(kernel))
    if _stamp(stamp_path).get("hash") == want and (root / "usr").is_dir():
        return root
    b = _Builder(kernel, log)
    b.logfile.write_text("")
    t0 = time.monotonic()
    log(f"[{kernel.name}] building the root for {kernel.abi} (first time 5-10 min; log: {b.logfile})")
    wheels = _wheels(b)
    stamp_path.unlink(missing_ok=True)
    _remove_tree(root)
    tmp = d / "root.building"
    _remove_tree(tmp)
    archives = CACHE / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)

    b.step(f"debootstrap {SUITE} (about a minute)")
    b.run("debootstrap", "--variant=minbase", f"--cache-dir={archives}", SUITE, str(tmp), MIRROR, timeout=1200)
    (tmp / "etc/apt/sources.list").write_text(_sources(kernel))
    (tmp / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")  # no service starts in the chroot
    (tmp / "usr/sbin/policy-rc.d").chmod(0o755)
    shutil.copy("/etc/resolv.conf", tmp / "etc/resolv.conf")
    (tmp / "etc/hostname").write_text("sonde-guest\n")
    (tmp / "etc/hosts").write_text("127.0.0.1 localhost sonde-guest\n::1 localhost ip6-localhost ip6-loopback\n")
    guest_archives = tmp / "var/cache/apt/archives"
    with _chroot_mounts(tmp):
        guest_archives.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(archives), str(guest_archives)], check=True, capture_output=True)
        apt = ["apt-get", "-y", "-q", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold"]
        b.step("apt-get update")
        b.chroot(tmp, "apt-get", "-q", "update", timeout=600)
        b.step(f"apt-get install {' '.join(BASE_PACKAGES)}")
        b.chroot(tmp, *apt, "install", *BASE_PACKAGES)
        b.step(f"apt-get install {' '.join(kernel.packages)} (the postinst makes the initrd)")
        target = ["-t", f"{SUITE}-backports"] if kernel.backports else []
        try:
            b.chroot(tmp, *apt, *target, "install", *kernel.packages)
        except KernelImageError as e:
            raise KernelImageError(str(e) + _current_abi_hint(b, tmp, kernel)) from None
        b.step("Python dependencies into a --system-site-packages venv (offline)")
        shutil.copytree(wheels, tmp / "tmp/wheels")
        b.chroot(tmp, "/usr/bin/python3", "-m", "venv", "--system-site-packages", GUEST_VENV)
        b.chroot(tmp, f"{GUEST_VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                 "--find-links", "/tmp/wheels", "-r", "/tmp/wheels/requirements.txt", timeout=900)
        freeze = b.chroot(tmp, f"{GUEST_VENV}/bin/pip", "freeze", "--disable-pip-version-check", timeout=120)
        b.chroot(tmp, f"{GUEST_VENV}/bin/python", "-c", "import bcc, pytest, yaml, pydantic", timeout=120)
        versions = b.chroot(tmp, "dpkg-query", "-W", "-f", "${Package} ${Version}\n", *kernel.packages,
                            "python3-bpfcc", "python3", timeout=60)
        b.step("clean up")
        subprocess.run(["umount", str(guest_archives)], check=False, capture_output=True)
        b.chroot(tmp, "apt-get", "clean", timeout=120)
    _umount_all(tmp)
    shutil.rmtree(tmp / "tmp/wheels", ignore_errors=True)
    for p in (tmp / "var/lib/apt/lists").glob("*"):
        if p.is_file():
            p.unlink()
    (tmp / "usr/sbin/policy-rc.d").unlink()
    (tmp / "etc/resolv.conf").write_text("")  # the guest has no network

    # bcc compiles against /lib/modules/<abi>/build; the headers package links it.
    mods = tmp / "lib/modules" / kernel.abi
    for link, src in (("build", f"/usr/src/linux-headers-{kernel.abi}"),
                      ("source", f"/usr/src/linux-headers-{kernel.abi.rsplit('-', 1)[0]}-common")):
        if not (tmp / src.lstrip("/")).is_dir():
            if link == "build":
                raise KernelImageError(f"[{kernel.name}] {src} missing after installing {kernel.packages[1]}")
            continue
        target = mods / link
        if not target.is_symlink() or not (tmp / os.readlink(target).lstrip("/")).exists():
            target.unlink(missing_ok=True)
            target.symlink_to(src)
    for f in ("vmlinuz", "initrd.img"):
        if not (tmp / f"boot/{f}-{kernel.abi}").exists():
            raise KernelImageError(f"[{kernel.name}] /boot/{f}-{kernel.abi} missing; see {b.logfile}")

    tmp.rename(root)
    stamp = {"hash": want, "abi": kernel.abi, "recipe": root_recipe(kernel),
             "packages": dict(line.split(" ", 1) for line in versions.strip().splitlines()),
             "pip": freeze.split(), "seconds": round(time.monotonic() - t0), "built": time.strftime("%F %T")}
    stamp_path.write_text(json.dumps(stamp, indent=1) + "\n")
    log(f"[{kernel.name}] root built in {stamp['seconds']} s ({kernel.abi}: "
        f"{stamp['packages'].get(kernel.packages[0], '?')})")
    return root


def _make_image(kernel: Kernel, root: Path, log: Log) -> Image:
    d = kernel_dir(kernel)
    b = _Builder(kernel, log)
    t0 = time.monotonic()
    (d / "stamp.json").unlink(missing_ok=True)
    init = root / "sbin/sonde-init"
    init.write_text(INIT)
    init.chmod(0o755)
    used = int(subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True, check=True).stdout.split()[0])
    size = int(used * 1.2) + (2 << 30)  # sparse; 2 GiB free for the tests (/tmp is on it)
    b.step(f"mkfs.ext4 -d root ({used >> 20} MiB used, image {size >> 20} MiB)")
    tmp = d / "disk.img.building"
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size)
    b.run("mkfs.ext4", "-q", "-F", "-L", "sonde-root", "-d", str(root), str(tmp), timeout=1200)
    for f in ("vmlinuz", "initrd.img"):  # replaced by rename: a VM booting now keeps its files
        shutil.copy(root / f"boot/{f}-{kernel.abi}", d / f"{f}.building")
        (d / f"{f}.building").rename(d / f)
    tmp.rename(d / "disk.img")
    root_stamp = _stamp(d / "root.json")
    stamp = {"hash": _digest(image_recipe(kernel)), "abi": kernel.abi, "root": root_stamp.get("hash"),
             "packages": root_stamp.get("packages", {}), "root_seconds": root_stamp.get("seconds"),
             "image_seconds": round(time.monotonic() - t0), "built": time.strftime("%F %T")}
    (d / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return Image(kernel, d / "disk.img", d / "vmlinuz", d / "initrd.img", stamp)


# ------------------------------------------------------------------------- booting

@dataclass
class JobResult:
    kernel: str
    rc: int | None          # the job's exit code; None when it never finished (timeout, crash)
    output: str             # the job's stdout+stderr
    console: str            # the whole serial console
    seconds: float
    timed_out: bool = False
    files: dict[str, str] = field(default_factory=dict)  # text files the job left in /job

    def summary(self) -> str:
        state = "timed out" if self.timed_out else f"rc={self.rc}"
        return f"{self.kernel}: {state} after {self.seconds:.0f} s"


def boot(image: Image, job: str, timeout: float = 300, memory_mb: int = 2048, cpus: int = 2,
         env: dict[str, str] | None = None, keep: Path | None = None, log: Log = print) -> JobResult:
    """Boot `image` and run the shell script `job` in it (cwd /src, the checkout read-only;
    /job is a writable share the host reads back). Kills QEMU after `timeout` seconds."""
    jobdir = Path(tempfile.mkdtemp(prefix=f"sonde-kernel-{image.kernel.name}-", dir="/var/tmp"))
    try:
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        # The checkout imports as the `sonde` package (as the wheel installs it): /pkgs/sonde -> /src.
        (jobdir / "job.sh").write_text("set -u\nmkdir -p /pkgs && ln -sfn /src /pkgs/sonde\ncd /src\n"
                                       + exports + job + "\n")
        console = jobdir / "console.log"
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
               "-nodefaults", "-display", "none", "-no-reboot",
               "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd),
               "-drive", f"file={image.disk},if=virtio,format=raw,snapshot=on",
               "-virtfs", f"local,path={jobdir},mount_tag=job,security_model=none",
               "-virtfs", f"local,path={REPO},mount_tag=src,security_model=none,readonly=on,multidevs=remap",
               "-nic", "none", "-serial", f"file:{console}",
               "-append", f"console=ttyS0 root=/dev/vda rw init=/sbin/sonde-init panic=-1 quiet {KERNEL_ARGS}".strip()]
        with _flock(".boot-lock", log, "VM (one at a time: TCG takes both cores)"):
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()  # by pid: only the QEMU this call started
                out, _ = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
            seconds = time.monotonic() - t0
        text = console.read_text(errors="replace") if console.exists() else ""
        if proc.returncode not in (0, None) and not timed_out:
            text += f"\n[qemu exited {proc.returncode}: {out.decode(errors='replace').strip()}]"
        m = re.search(re.escape(END) + r" rc=(\d+)", text)
        rc = int(m.group(1)) if m else None
        output_file = jobdir / "output.log"
        if output_file.exists():
            output = output_file.read_text(errors="replace")
        else:
            output = text.split(BEGIN, 1)[-1].split(END, 1)[0] if BEGIN in text else ""
        files = {p.name: p.read_text(errors="replace") for p in jobdir.iterdir()
                 if p.is_file() and p.suffix in (".rc", ".xml", ".txt") and p.stat().st_size < 4 << 20}
        if keep:
            shutil.copytree(jobdir, keep, dirs_exist_ok=True)
        return JobResult(image.kernel.name, rc, output, text, seconds, timed_out, files)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


# ---------------------------------------------------------------------------- jobs

def guest_env() -> dict[str, str]:
    """The environment a guest job runs with: the checkout importable as `sonde`, nothing written
    into it, and the CI rule passed through."""
    env = {"PATH": f"{GUEST_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "VIRTUAL_ENV": GUEST_VENV, "PYTHONPATH": "/pkgs", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONUNBUFFERED": "1", "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis", "HOME": "/root"}
    if "CI" in os.environ:
        env["CI"] = os.environ["CI"]
    return env


def smoke_step() -> str:
    """Shell: list the probes, load each default-enabled one; rc in /job/smoke.rc."""
    return "echo '--- smoke: always-on probes'\npython tests/kernels/smoke.py\necho $? > /job/smoke.rc\n"


def pytest_step(marker: str, paths: str = "tests/") -> str:
    """Shell: the guest's pytest on the marker; rc in /job/pytest.rc, results in /job/junit.xml."""
    return (f"echo '--- pytest -m {marker}'\n"
            f"python -m pytest -p no:cacheprovider -m {shlex.quote(marker)} --junitxml=/job/junit.xml "
            f"-o junit_family=xunit1 {paths}\n"
            "echo $? > /job/pytest.rc\n")


def run(kernel: Kernel, job: str, timeout: float = 300, log: Log = print, **kw) -> JobResult:
    return boot(ensure_image(kernel, log), job, timeout=timeout, env=guest_env(), log=log, **kw)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "run", "smoke"):
        print(__doc__.split("\n\n")[-1])
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "run":
        if len(args) != 2:
            print("usage: python -m tests.kernels.qemu run KERNEL 'SHELL COMMAND'")
            return 2
        res = run(KERNELS[args[0]], args[1], timeout=float(os.environ.get("SONDE_KERNEL_TIMEOUT", 600)))
        print(res.output, end="")
        print(res.summary())
        return res.rc if res.rc is not None else 1
    names = args or list(KERNELS)
    rc = 0
    for name in names:
        k = KERNELS[name]
        if cmd == "build":
            img = ensure_image(k)
            print(f"{name}: {img.disk} ({json.dumps(img.stamp.get('packages', {}))})")
        else:
            res = run(k, smoke_step(), timeout=600)
            print(res.output, end="")
            print(res.summary())
            rc |= 0 if res.rc == 0 else 1
    return rc


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
