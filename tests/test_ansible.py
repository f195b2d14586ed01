"""Fleet rollout (issue 8): the Ansible role, linted, and applied for real to a
Debian 12 host where systemd is PID 1 (debootstrap + systemd-nspawn, over SSH)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, need, start_influx, wait_until
from sonde.ingest.output.embedded import InfluxServer
from systemd_host import SystemdHost, ensure_root, missing_tools

pytestmark = pytest.mark.ansible

ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
PASSWORD = "rollout-S3CRET-pw"  # must never show up outside the root-only secret file
DEFAULT_PROBES = {"block_io", "oom", "cpu", "tcp"}
# The unit's capability bounding set, with each one's bit (linux/capability.h).
UNIT_CAPS = {"cap_dac_read_search": 2, "cap_sys_ptrace": 19, "cap_sys_admin": 21, "cap_perfmon": 38, "cap_bpf": 39}
# `systemd-analyze security` of the unit on the test host (systemd 252), as the README
# states: 2.4 before the tcp probe's capabilities; CAP_SYS_ADMIN, CAP_SYS_PTRACE and
# CAP_DAC_READ_SEARCH with RestrictNamespaces=net bring it to 3.2.
MAX_EXPOSURE = 3.2


def _need_host_tools() -> None:
    need(os.geteuid() == 0, "the test host needs root (overlay mount, systemd-nspawn)")
    missing = missing_tools()
    need(not missing, f"missing {', '.join(missing)}: apt-get install debootstrap systemd-container openssh-client")
    need((BIN / "ansible-playbook").exists(), "ansible-core is not installed in the venv (pip install -e .[test])")


class Play:
    """One ansible-playbook run: its output and its recap for one host."""

    def __init__(self, proc: subprocess.CompletedProcess, host: str):
        self.rc, self.out = proc.returncode, proc.stdout + proc.stderr
        m = re.search(rf"^{re.escape(host)}\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                      self.out, re.M)
        assert m, f"no PLAY RECAP line for {host}:\n{self.out[-3000:]}"
        self.ok, self.changed, self.unreachable, self.failed = (int(g) for g in m.groups())

    @property
    def clean(self) -> bool:
        return self.rc == 0 and self.failed == 0 and self.unreachable == 0

    def task_result(self, task: str) -> str:
        """The first status word (ok, changed, skipping, fatal) printed for a task."""
        m = re.search(rf"^(?:TASK|RUNNING HANDLER) \[{re.escape(task)}\][^\n]*\n(?:[^\n]*\n)*?(ok|changed|skipping|fatal):", self.out, re.M)
        return m.group(1) if m else "absent"

    def handler_runs(self, name: str) -> int:
        return len(re.findall(rf"^RUNNING HANDLER \[sonde : {re.escape(name)}\]", self.out, re.M))


class Rollout:
    """An inventory for one test host, and ansible-playbook against it."""

    def __init__(self, host: SystemdHost, tmp: Path, group_vars: dict):
        self.host, self.tmp = host, tmp
        self.inventory = tmp / "inventory.yml"
        self.group_vars = dict(group_vars)
        self.write()

    def write(self) -> None:
        inv = {"all": {"children": {
            "sonde": {"hosts": {self.host.name: self.host.inventory_vars()}, "vars": self.group_vars},
            "grafana": {"hosts": {self.host.name: self.host.inventory_vars()}}}}}
        self.inventory.write_text(yaml.safe_dump(inv, sort_keys=False))

    def play(self, playbook: str = "site.yml", *args: str, timeout: float = 900) -> Play:
        # Only ansible.cfg decides: no ANSIBLE_* from the caller (a json callback would
        # make every recap check pass on nothing).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1", PATH=f"{BIN}:{os.environ['PATH']}")
        proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(self.inventory), playbook, *args],
                              cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=timeout)
        return Play(proc, self.host.name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The Sonde wheel built from this checkout, as the role's pinned source."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # build from a copy, so the checkout gets no build/ directory
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", ".hypothesis", "bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("sonde-*.whl"))


@pytest.fixture(scope="module")
def base_root() -> Path:
    _need_host_tools()
    return ensure_root()


@pytest.fixture
def fresh_host(base_root, tmp_path):
    with SystemdHost("sonde-fresh", base_root, tmp_path / "host", free_port()) as host:
        yield host


@pytest.fixture(scope="module")
def shared_influx(tmp_path_factory):
    """The fleet's shared InfluxDB 1.x, with authentication on."""
    server = start_influx(tmp_path_factory.mktemp("shared-influx"), auth=True)
    try:
        server.query(f"CREATE USER admin WITH PASSWORD '{PASSWORD}' WITH ALL PRIVILEGES")
        server.query('CREATE DATABASE "fleet"', auth=("admin", PASSWORD))
        yield server
    finally:
        server.stop()


def shared_vars(influx, wheel: Path) -> dict:
    return {"sonde_wheel": str(wheel),
            "sonde_influxdb": {"api": "v1", "url": influx.url, "database": "fleet", "username": "admin"},
            "sonde_influxdb_password": PASSWORD,
            "sonde_interval_seconds": 2}


@pytest.fixture(scope="module")
def deployed(base_root, shared_influx, wheel, tmp_path_factory):
    """One host with the role applied for real, and the output of that first run."""
    tmp = tmp_path_factory.mktemp("deployed")
    with SystemdHost("sonde-node-1", base_root, tmp / "host", free_port()) as host:
        rollout = Rollout(host, tmp, shared_vars(shared_influx, wheel))
        first = rollout.play()
        assert first.clean, first.out[-6000:]
        yield rollout, first


def journal_starts(host: SystemdHost) -> int:
    out = host.ssh("journalctl -u sonde.service -o cat --no-pager").stdout
    return len(re.findall(r"^Started sonde\.service", out, re.M))


def invocation(host: SystemdHost) -> str:
    return host.ssh("systemctl show -p InvocationID --value sonde").stdout.strip()


# -- lint --------------------------------------------------------------------

def test_ansible_lint_production_profile():
    lint = BIN / "ansible-lint"
    need(lint.exists(), "ansible-lint is not installed in the venv (pip install -e .[test])")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "NO_COLOR": "1"}
    proc = subprocess.run([str(lint), "--offline", "--profile", "production", "--nocolor", "."],
                          cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_every_public_variable_is_declared_and_prefixed():
    for role in ("sonde", "sonde_grafana"):
        specs = yaml.safe_load((ANSIBLE / f"roles/{role}/meta/argument_specs.yml").read_text())
        options = specs["argument_specs"]["main"]["options"]
        defaults = yaml.safe_load((ANSIBLE / f"roles/{role}/defaults/main.yml").read_text())
        assert set(defaults) == set(options), f"{role}: defaults and argument_specs disagree"
        for name, spec in options.items():
            assert name.startswith(f"{role}_"), f"{role}: {name} lacks the role prefix"
            assert spec.get("type") and spec.get("description"), f"{role}: {name} lacks a type or description"
            if isinstance(defaults[name], (str, int, float, bool)) and "{{" not in str(defaults[name]):
                assert str(spec.get("default")) == str(defaults[name]), f"{role}: {name} default differs"
        internal = yaml.safe_load(p.read_text()) if (p := ANSIBLE / f"roles/{role}/vars/main.yml").exists() else {}
        assert all(k.startswith(f"_{role}_") for k in internal or {}), "internal variables start with _<role>_"


def test_readme_role_variables_are_generated():
    from sonde.ingest.docs import role_variables, section

    generated = role_variables(ANSIBLE / "roles/sonde/meta/argument_specs.yml")
    assert section((REPO / "README.md").read_text(), "role-vars") == generated, \
        "README role variables are stale: run python -m sonde.ingest.docs README.md"


def test_wheel_carries_what_the_agent_loads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for probe in (REPO / "bpf").glob("*/*.bpf.c"):
        assert f"sonde/bpf/{probe.parent.name}/{probe.name}" in names
    assert {"sonde/bpf/sonde.h", "sonde/alerts/thresholds.yaml", "sonde/dashboards/host.dashboard.py"} <= names
    assert not any(n.startswith(("ingest/", "bpf/")) for n in names), "the wheel installs only the sonde namespace"


# -- a fresh host ------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ({"sonde_interval_seconds": "often"}, "sonde_interval_seconds"),
    ({"sonde_influxdb": {"api": "v1", "database": "fleet"}}, "api is v1 but all of the following are missing: url"),
    ({"sonde_influxdb": {"api": "v3", "url": "http://x"}}, "value of api must be one of: embedded, v1, v2"),
])
def test_bad_variables_fail_at_argument_specs_before_any_change(fresh_host, shared_influx, wheel, tmp_path,
                                                                bad, message):
    rollout = Rollout(fresh_host, tmp_path, {**shared_vars(shared_influx, wheel), **bad})
    play = rollout.play()
    assert play.rc != 0 and play.failed == 1, play.out[-3000:]
    assert play.changed == 0
    failed_task = re.findall(r"^TASK \[(.+?)\]", play.out, re.M)[-1]
    assert failed_task.startswith("sonde : Validating arguments against arg spec 'main'"), play.out[-3000:]
    assert "Validation of arguments failed" in play.out
    assert message in play.out, play.out[-3000:]
    assert PASSWORD not in play.out
    assert fresh_host.ssh("test -e /opt/sonde || test -e /etc/sonde", check=False).returncode == 1


def test_unpinned_source_fails_in_preflight_before_any_change(fresh_host, shared_influx, wheel, tmp_path):
    """No wheel and no index: `pip install sonde==…` would fetch another project from PyPI."""
    rollout = Rollout(fresh_host, tmp_path, {**shared_vars(shared_influx, wheel), "sonde_wheel": "",
                                             "sonde_version": "0.1.0"})
    play = rollout.play()
    assert play.rc != 0 and play.failed == 1 and play.changed == 0, play.out[-3000:]
    assert play.task_result("sonde : Check the Sonde source is pinned") == "fatal"
    assert "set sonde_wheel" in play.out and "the name sonde on PyPI is another project" in play.out
    assert fresh_host.ssh("test -e /opt/sonde || test -e /etc/sonde", check=False).returncode == 1


# Each kernel prerequisite, taken away on a fresh host: the extra var outranks the
# role's floor; a tmpfs hides /sys/kernel/btf, or every cgroup2 mount the agent would use.
KERNEL_GAPS = {
    "floor": ("-e _sonde_min_kernel=99.0", "Check the kernel is one the probes are proven on", "older than 99.0"),
    "btf": ("mount -t tmpfs tmpfs /sys/kernel/btf", "Check the kernel exposes its BTF", "CONFIG_DEBUG_INFO_BTF=y"),
    "cgroup2": ("for d in /sys/fs/cgroup/unified /sys/fs/cgroup; do [ \"$(stat -f -c %T $d)\" = cgroup2fs ] && "
                "mount -t tmpfs tmpfs $d; done; true", "Check a cgroup2 hierarchy is mounted", "mount -t cgroup2"),
}


@pytest.mark.parametrize("gap", sorted(KERNEL_GAPS))
def test_a_kernel_the_probes_cannot_run_on_fails_in_preflight(fresh_host, shared_influx, wheel, tmp_path, gap):
    setup, task, advice = KERNEL_GAPS[gap]
    args = setup.split(" ", 1) if setup.startswith("-e ") else []
    if not args:
        fresh_host.ssh(setup)
    play = Rollout(fresh_host, tmp_path, shared_vars(shared_influx, wheel)).play("site.yml", *args)
    assert play.rc != 0 and play.failed == 1 and play.changed == 0, play.out[-3000:]
    assert play.task_result(f"sonde : {task}") == "fatal", play.out[-3000:]
    assert advice in play.out, play.out[-3000:]
    assert fresh_host.ssh("test -e /opt/sonde || test -e /etc/sonde", check=False).returncode == 1


def test_check_mode_on_a_fresh_host_changes_nothing(fresh_host, shared_influx, wheel, tmp_path):
    rollout = Rollout(fresh_host, tmp_path, shared_vars(shared_influx, wheel))
    play = rollout.play("site.yml", "--check", "--diff")
    assert play.clean, play.out[-6000:]
    assert play.changed > 0
    assert "+interval_seconds: 2" in play.out  # the config's diff
    # the unit's diff
    assert "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH" in play.out
    assert PASSWORD not in play.out
    assert fresh_host.ssh("test -e /opt/sonde || test -e /etc/sonde || test -e /etc/systemd/system/sonde.service",
                          check=False).returncode == 1
    assert fresh_host.ssh("dpkg -s python3-bpfcc", check=False).returncode != 0


# -- applied -----------------------------------------------------------------

def test_applied_service_is_active_and_points_arrive(deployed, shared_influx):
    rollout, first = deployed
    host = rollout.host
    assert host.ssh("systemctl is-active sonde").stdout.strip() == "active"
    assert host.ssh("systemctl is-enabled sonde").stdout.strip() == "enabled"
    assert journal_starts(host) == 1  # started once, by the handler, not started and then restarted

    def rows():
        res = shared_influx.query(f"SELECT count(poll_success) FROM sonde_probe WHERE host = '{host.name}' "
                                  f"GROUP BY probe", db="fleet", auth=("admin", PASSWORD))["results"][0]
        return {s["tags"]["probe"]: s["values"][0][1] for s in res.get("series", [])}

    probes = wait_until(lambda: (r := rows()) and len(r) >= 4 and r, timeout=60, what="points from the test host")
    assert DEFAULT_PROBES <= set(probes)
    # Kernel data from that host, not only self-metrics: its CPUs' scheduler activity.
    cpu = shared_influx.query(f"SELECT sum(oncpu_us) FROM process_cpu WHERE host = '{host.name}'",
                              db="fleet", auth=("admin", PASSWORD))["results"][0]
    assert cpu["series"][0]["values"][0][1] > 0


def test_unit_is_hardened_and_verified(deployed):
    host = deployed[0].host
    verify = host.ssh("systemd-analyze verify /etc/systemd/system/sonde.service", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    show = dict(line.split("=", 1) for line in host.ssh(
        "systemctl show sonde -p CapabilityBoundingSet -p NoNewPrivileges -p ProtectSystem -p ProtectHome "
        "-p Restart -p StateDirectory -p MainPID -p RestrictNamespaces").stdout.splitlines())
    assert set(show["CapabilityBoundingSet"].split()) == set(UNIT_CAPS)
    assert show["RestrictNamespaces"] == "net"
    assert show["NoNewPrivileges"] == "yes"
    assert show["ProtectSystem"] == "strict"
    assert show["ProtectHome"] == "yes"
    assert show["Restart"] == "on-failure"
    assert show["StateDirectory"] == "sonde"
    # The running agent holds exactly those.
    cap_eff = host.ssh(f"grep CapEff /proc/{show['MainPID']}/status").stdout.split()[1]
    assert int(cap_eff, 16) == sum(1 << bit for bit in UNIT_CAPS.values())
    # systemd's own exposure score (0 = fully confined, 10 = unconfined), as the README states.
    security = host.ssh("systemd-analyze security sonde --no-pager", check=False).stdout
    exposure = float(re.search(r"Overall exposure level for sonde\.service: ([0-9.]+)", security).group(1))
    assert exposure <= MAX_EXPOSURE, security[-2000:]
    # The file system is read-only to it but for its state dir.
    pid = show["MainPID"]
    assert host.ssh(f"nsenter -t {pid} -m sh -c 'touch /etc/x'", check=False).returncode != 0
    assert host.ssh(f"nsenter -t {pid} -m sh -c 'touch /var/lib/sonde/x && rm /var/lib/sonde/x'").returncode == 0


# A listener and one connection to it over loopback, kept open and busy; with
# `netns`, in the new network namespace it runs in (unshare -rn), whose loopback it
# brings up itself (the test host has no CAP_NET_ADMIN on the machine's network).
PAIR = """\
import fcntl, socket, struct, sys, time
port = int(sys.argv[1])
if sys.argv[2:] == ["netns"]:
    s = socket.socket()
    flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
srv = socket.socket()
srv.bind(("127.0.0.1", port))
srv.listen()
cli = socket.create_connection(("127.0.0.1", port))
conn, _ = srv.accept()
while True:
    cli.sendall(b"x" * 1000)
    conn.recv(65536)
    time.sleep(0.2)
"""


def test_capabilities_give_the_tcp_probe_every_owner_and_namespace(deployed, shared_influx, tmp_path):
    """What the tcp probe's capabilities are for, under the unit: a listening or accepted
    socket's owner is the process whose /proc/PID/fd links to it (CAP_SYS_PTRACE for a
    process with more capabilities than the agent or another uid, CAP_DAC_READ_SEARCH
    to list another user's fd directory), and a socket in another network namespace is
    only in a sock_diag dump made there (setns: CAP_SYS_ADMIN, RestrictNamespaces=net).
    Checked here: the unit without any one of them loses at least one of these owners
    (without CAP_SYS_ADMIN the tcp probe does not load at all)."""
    host = deployed[0].host
    script = tmp_path / "pair.py"
    script.write_text(PAIR)
    host.put(script, "/usr/local/lib/sonde-test-pair.py")
    host.ssh("chmod 0644 /usr/local/lib/sonde-test-pair.py")
    run = "/usr/bin/python3 /usr/local/lib/sonde-test-pair.py"
    units = {  # systemd-run starts each as root with every capability unless told otherwise
        "sonde-pair-root": f"{run} {free_port()}",
        "sonde-pair-nobody": f"-p User=nobody {run} {free_port()}",
        "sonde-pair-netns": f"/usr/bin/unshare -rn {run} {free_port()} netns",
    }
    try:
        for unit, cmd in units.items():
            host.ssh(f"systemd-run --quiet --unit={unit} {cmd}")
        pids = {unit: host.ssh(f"systemctl show -p MainPID --value {unit}").stdout.strip() for unit in units}
        assert "0" not in pids.values(), host.ssh("systemctl status 'sonde-pair-*' --no-pager", check=False).stdout
        netns = {unit: host.ssh(f"readlink /proc/{pid}/ns/net").stdout.strip() for unit, pid in pids.items()}
        assert netns["sonde-pair-netns"] != netns["sonde-pair-root"]

        def states() -> dict[str, set[str]]:
            res = shared_influx.query(
                f"SELECT last(sockets) FROM tcp_states WHERE host = '{host.name}' AND time > now() - 10s "
                f"GROUP BY pid, state", db="fleet", auth=("admin", PASSWORD))["results"][0]
            seen: dict[str, set[str]] = {}
            for series in res.get("series", []):
                seen.setdefault(series["tags"]["pid"], set()).add(series["tags"]["state"])
            return seen

        want = {pid: {"LISTEN", "ESTABLISHED"} for pid in pids.values()}
        wait_until(lambda: all(want[pid] <= states().get(pid, set()) for pid in want), timeout=60,
                   what=f"the pairs' sockets attributed to their pids {pids}")
        journal = host.ssh("journalctl -u sonde -o cat --no-pager", check=False).stdout
        assert "cannot open a sock_diag socket" not in journal, journal[-2000:]
    finally:
        host.ssh(f"systemctl stop {' '.join(units)}", check=False)


def test_secret_is_root_only_and_nowhere_else(deployed):
    rollout, first = deployed
    host = rollout.host
    assert PASSWORD not in first.out
    assert host.ssh("stat -c '%a %U' /etc/sonde/influxdb.secret").stdout.strip() == "600 root"
    assert host.ssh("cat /etc/sonde/influxdb.secret").stdout.strip() == PASSWORD
    config = host.ssh("cat /etc/sonde/sonde.yaml").stdout
    assert "password_file: /etc/sonde/influxdb.secret" in config and PASSWORD not in config
    unit = host.ssh("cat /etc/systemd/system/sonde.service; systemctl show sonde -p Environment").stdout
    assert PASSWORD not in unit
    pid = host.ssh("systemctl show -p MainPID --value sonde").stdout.strip()
    argv = host.ssh(f"tr '\\0' ' ' < /proc/{pid}/cmdline; tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    assert PASSWORD not in argv
    assert PASSWORD not in host.ssh("journalctl --no-pager -o cat").stdout


def test_second_run_changes_nothing(deployed):
    rollout, _ = deployed
    before = invocation(rollout.host)
    again = rollout.play()
    assert again.clean, again.out[-4000:]
    assert again.changed == 0, again.out[-4000:]
    assert again.handler_runs("Restart Sonde") == 0
    assert invocation(rollout.host) == before


def test_changing_one_variable_restarts_exactly_once(deployed, shared_influx):
    rollout, _ = deployed
    host = rollout.host
    before, starts = invocation(host), journal_starts(host)
    rollout.group_vars["sonde_interval_seconds"] = 3
    rollout.write()
    # Check mode shows the change as a diff and restarts nothing.
    preview = rollout.play("site.yml", "--check", "--diff")
    assert preview.clean and preview.changed >= 1, preview.out[-4000:]
    assert "-interval_seconds: 2" in preview.out and "+interval_seconds: 3" in preview.out
    assert invocation(host) == before and journal_starts(host) == starts
    # Applied: the config task changes, the handler restarts the service, once.
    applied = rollout.play()
    assert applied.clean, applied.out[-4000:]
    assert applied.changed == 2, applied.out[-4000:]  # the config and its handler
    assert applied.handler_runs("Restart Sonde") == 1
    assert invocation(host) != before
    assert journal_starts(host) == starts + 1
    assert "interval_seconds: 3" in host.ssh("cat /etc/sonde/sonde.yaml").stdout
    assert host.ssh("systemctl is-active sonde").stdout.strip() == "active"


def test_secret_rotation_is_checked_before_the_restart(deployed, shared_influx):
    rollout, _ = deployed
    host = rollout.host
    new = "rotated-S3CRET-pw"
    try:
        # A password the server does not take yet: `sonde check` refuses the staged
        # secret, so the one in use stays and the agent is not restarted.
        before = invocation(host)
        rollout.group_vars["sonde_influxdb_password"] = new
        rollout.write()
        refused = rollout.play("site.yml", "-vvv", "--diff")
        assert refused.rc != 0 and refused.failed == 1, refused.out[-4000:]
        assert refused.task_result("sonde : Install the InfluxDB secret") == "fatal"
        assert "refused the credentials" in refused.out
        assert refused.handler_runs("Restart Sonde") == 0
        assert invocation(host) == before
        assert host.ssh("cat /etc/sonde/influxdb.secret").stdout.strip() == PASSWORD  # the one in use stays
        assert host.ssh("systemctl is-active sonde").stdout.strip() == "active"
        # The server's password rotates; the next run installs the new secret and restarts once.
        shared_influx.query(f"SET PASSWORD FOR admin = '{new}'", auth=("admin", PASSWORD))
        starts = journal_starts(host)
        rotated = rollout.play("site.yml", "-vvv", "--diff")
        assert rotated.clean, rotated.out[-4000:]
        assert rotated.task_result("sonde : Install the InfluxDB secret") == "changed"
        assert rotated.handler_runs("Restart Sonde") == 1 and journal_starts(host) == starts + 1
        assert host.ssh("cat /etc/sonde/influxdb.secret").stdout.strip() == new
        for out in (refused.out, rotated.out):
            assert PASSWORD not in out and new not in out  # not even at -vvv with --diff
    finally:
        try:
            shared_influx.query(f"SET PASSWORD FOR admin = '{PASSWORD}'", auth=("admin", new))
        except OSError:
            pass  # the test stopped before the server's password changed
        rollout.group_vars["sonde_influxdb_password"] = PASSWORD
        rollout.write()
        restored = rollout.play()
    assert restored.clean, restored.out[-4000:]


def test_dashboards_playbook_provisions_grafana_dirs(deployed):
    rollout, _ = deployed
    host = rollout.host
    # No Grafana can be installed here; a stand-in unit of that name shows the handler
    # restarts the service once when the datasource and alert rules change.
    host.ssh("printf '[Service]\\nExecStart=/bin/sleep infinity\\n' > /etc/systemd/system/grafana-server.service"
             " && systemctl daemon-reload && systemctl start grafana-server && groupadd -f grafana")
    grafana_pw = "grafana-READ-S3CRET"
    extra = ["-e", "sonde_grafana_influxdb_url=http://influx.example:8086", "-e", "sonde_grafana_influxdb_database=fleet",
             "-e", "sonde_grafana_influxdb_user=grafana", "-e", f"sonde_grafana_influxdb_password={grafana_pw}",
             "-e", "sonde_grafana_poll_interval_seconds=30"]
    grafana_before = host.ssh("systemctl show -p InvocationID --value grafana-server").stdout.strip()
    play = rollout.play("dashboards.yml", "--diff", *extra)
    assert play.clean, play.out[-4000:]
    listing = host.ssh("ls /var/lib/grafana/dashboards/sonde").stdout.split()
    assert {"host.json", "network.json", "loadbalancer.json", "disk.json", "agent.json"} <= set(listing)
    intervals = set()
    for name in listing:
        dashboard = json.loads(host.ssh(f"cat /var/lib/grafana/dashboards/sonde/{name}").stdout)
        assert dashboard["panels"], name
        intervals |= {p["interval"] for p in dashboard["panels"] if "interval" in p}
    # 30 s polls: every interval Grafana picks from 30 s up (1m, 2m, 5m, ...) holds whole polls
    assert intervals == {"30s"}, intervals
    provider = yaml.safe_load(host.ssh("cat /etc/grafana/provisioning/dashboards/sonde.yaml").stdout)
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/sonde"
    datasource = yaml.safe_load(host.ssh("cat /etc/grafana/provisioning/datasources/sonde.yaml").stdout)
    assert datasource["datasources"][0]["url"] == "http://influx.example:8086"
    assert datasource["datasources"][0]["jsonData"]["dbName"] == "fleet"
    assert datasource["datasources"][0]["user"] == "grafana"
    assert datasource["datasources"][0]["secureJsonData"] == {"password": grafana_pw}
    mode = host.ssh("stat -c '%a %U %G' /etc/grafana/provisioning/datasources/sonde.yaml").stdout.strip()
    assert mode == "640 root grafana"
    assert grafana_pw not in play.out
    rules = yaml.safe_load(host.ssh("cat /etc/grafana/provisioning/alerting/sonde.yaml").stdout)
    assert rules["groups"][0]["rules"]
    assert play.task_result("sonde_grafana : Restart the Grafana service") == "changed"
    grafana_after = host.ssh("systemctl show -p InvocationID --value grafana-server").stdout.strip()
    assert grafana_after != grafana_before
    again = rollout.play("dashboards.yml", "--diff", *extra)
    assert again.clean and again.changed == 0, again.out[-4000:]
    assert host.ssh("systemctl show -p InvocationID --value grafana-server").stdout.strip() == grafana_after


# -- the example group variables, each delivering for real --------------------

def example_group_vars(group: str) -> dict:
    return yaml.safe_load((ANSIBLE / f"inventory/group_vars/{group}.yml").read_text())


def test_example_embedded_group_runs_its_own_influxdb(base_root, wheel, tmp_path):
    http_port, rpc_port = free_port(), free_port()
    group = example_group_vars("sonde_embedded")
    with SystemdHost("sonde-embedded-1", base_root, tmp_path / "host", free_port()) as host:
        rollout = Rollout(host, tmp_path, {**group, "sonde_wheel": str(wheel), "sonde_interval_seconds": 2,
                                           # free loopback ports: the test host shares this machine's network
                                           "sonde_embedded_http_port": http_port,
                                           "sonde_embedded_rpc_port": rpc_port})
        play = rollout.play()
        assert play.clean, play.out[-6000:]
        # Debian's own influxdb.service never ran (masked before the package was installed);
        # the agent's influxd serves the points.
        assert host.ssh("systemctl is-active influxdb", check=False).stdout.strip() == "inactive"
        assert host.ssh("systemctl is-enabled influxdb", check=False).stdout.strip() == "masked"
        assert "influxdb.service" not in host.ssh("journalctl -o cat --no-pager | grep -i 'started influxdb'",
                                                  check=False).stdout
        local = InfluxServer(tmp_path / "unused", http_port, rpc_port)

        def probes():
            try:
                res = local.query(f"SELECT count(poll_success) FROM sonde_probe WHERE host = '{host.name}' GROUP BY probe",
                                  db="sonde")["results"][0]
            except OSError:  # the agent's influxd may still be starting
                return set()
            return {s["tags"]["probe"] for s in res.get("series", [])}
        assert DEFAULT_PROBES <= wait_until(
            lambda: (p := probes()) >= DEFAULT_PROBES and p, timeout=90,
            what="points in the host's embedded InfluxDB")
        # Its data lives in the unit's state dir, the one writable place.
        assert host.ssh("ls /var/lib/sonde").stdout.split()
        replay = rollout.play()
        assert replay.clean and replay.changed == 0, replay.out[-4000:]


def test_example_v2_group_writes_through_the_v2_api(base_root, wheel, victoria, tmp_path):
    group = example_group_vars("sonde_v2")
    assert group["sonde_influxdb"]["api"] == "v2"
    token = "vm-ignores-this-T0KEN"
    with SystemdHost("sonde-v2-1", base_root, tmp_path / "host", free_port()) as host:
        rollout = Rollout(host, tmp_path, {**group, "sonde_wheel": str(wheel), "sonde_interval_seconds": 2,
                                           "sonde_influxdb": {**group["sonde_influxdb"], "url": victoria.url},
                                           "sonde_influxdb_token": token})
        play = rollout.play()
        assert play.clean, play.out[-6000:]
        assert token not in play.out
        assert "token_file: /etc/sonde/influxdb.secret" in host.ssh("cat /etc/sonde/sonde.yaml").stdout
        def exported():
            try:
                return victoria.export(f'{{__name__="sonde_probe_poll_success",host="{host.name}"}}')
            except OSError:
                return []
        series = wait_until(exported, timeout=90, what="points in VictoriaMetrics from the test host")
        assert {s["metric"]["probe"] for s in series} >= DEFAULT_PROBES


def test_a_new_wheel_is_reinstalled_and_restarts_once(deployed, wheel, tmp_path):
    """Same version, different bytes (a rebuilt checkout): pip alone would keep the old one.
    The new wheel is already on the host, as if copied by a run that then failed: the
    copy task has nothing to do, yet the venv is brought up to it."""
    rollout, _ = deployed
    host = rollout.host
    rebuilt = tmp_path / wheel.name
    shutil.copy(wheel, rebuilt)
    with zipfile.ZipFile(rebuilt, "a") as z:
        z.comment = b"rebuilt"
    host.put(rebuilt, f"/opt/sonde/dist/{wheel.name}")
    before, starts = invocation(host), journal_starts(host)
    rollout.group_vars["sonde_wheel"] = str(rebuilt)
    rollout.write()
    preview = rollout.play("site.yml", "--check", "--diff")
    assert preview.clean, preview.out[-4000:]
    assert preview.task_result("sonde : Reinstall Sonde from a changed wheel") == "changed"
    assert invocation(host) == before
    play = rollout.play()
    assert play.clean, play.out[-4000:]
    assert re.search(r"^TASK \[sonde : Copy the Sonde wheel\][^\n]*\nok:", play.out, re.M), play.out[-4000:]
    assert re.search(r"^TASK \[sonde : Reinstall Sonde from a changed wheel\][^\n]*\nchanged:", play.out, re.M), \
        play.out[-4000:]
    assert play.handler_runs("Restart Sonde") == 1
    assert journal_starts(host) == starts + 1 and invocation(host) != before
    marker = host.ssh("cat /opt/sonde/venv/.sonde-wheel.sha1").stdout.strip()
    assert marker == hashlib.sha1(rebuilt.read_bytes()).hexdigest()
    assert host.ssh("systemctl is-active sonde").stdout.strip() == "active"
    replay = rollout.play()
    assert replay.clean and replay.changed == 0, replay.out[-4000:]
