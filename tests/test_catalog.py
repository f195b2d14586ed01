"""The catalog is the contract: probes emit only what it declares; docs/metrics.md is generated from it."""
import pytest

from conftest import REPO
from sonde.ingest.runtime import catalog
from sonde.ingest.errors import CatalogError
from sonde.ingest.runtime.probe import discover

pytestmark = [pytest.mark.skeleton]


def test_docs_metrics_md_is_current():
    on_disk = (REPO / "docs/metrics.md").read_text()
    assert on_disk == catalog.render_markdown(), \
        "docs/metrics.md is stale: regenerate with `sonde catalog --markdown > docs/metrics.md`"


@pytest.mark.parametrize("name, spec", sorted(discover().items()))
def test_every_probe_map_is_declared(name, spec):
    # Declared maps (CounterMap): checked here without a kernel. Decoded probes are
    # checked on what they really emit, below.
    for m in spec.maps:
        meas = catalog.MEASUREMENTS.get(m.map)
        assert meas is not None, f"probe {name}: map {m.map} is not a catalog measurement"
        assert set(m.fields) <= meas.field_names, f"probe {name}: undeclared fields {set(m.fields) - meas.field_names}"
        assert {"host", "pid", "comm"} <= meas.tag_names


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """Every probe loaded on the real kernel while the host does a little of what each
    observes (a TCP transfer, direct I/O on a loop device, an OOM kill in a memory
    cgroup), polled twice: probe name -> (its points, its sonde_probe points)."""
    import subprocess
    import time
    import uuid
    from pathlib import Path

    from conftest import bpf_prereqs, make_config, need, transfer
    from sonde.ingest.runtime.probe import LoadedProbe

    bpf_prereqs()
    need(Path("/sys/fs/cgroup/memory").is_dir() or Path("/sys/fs/cgroup/cgroup.controllers").exists(),
         "a memory cgroup controller")
    tmp = tmp_path_factory.mktemp("catalog")
    cfg = make_config(tmp)
    probes = {}
    out = {}
    dev = cg = None
    try:
        for name, spec in sorted(discover().items()):
            probes[name] = LoadedProbe.load(spec, cfg)
            probes[name].poll(time.time_ns())
        transfer(tmp, 100_000, "cat-tx", "cat-rx")
        img = tmp / "disk.img"
        subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
        dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                             check=True).stdout.strip()
        subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=16", "oflag=direct"], check=True,
                       capture_output=True)
        v1 = Path("/sys/fs/cgroup/memory")
        cg = (v1 if v1.is_dir() else Path("/sys/fs/cgroup")) / f"sonde-cat-{uuid.uuid4().hex[:8]}"
        cg.mkdir()
        (cg / ("memory.limit_in_bytes" if v1.is_dir() else "memory.max")).write_text(str(16 << 20))
        victim = subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec tail /dev/zero"])
        assert victim.wait(timeout=60) == -9
        time.sleep(0.5)  # the OOM event's perf buffer
        for name, p in probes.items():
            pts, selves = [], []
            for _ in range(2):
                new, me = p.poll(time.time_ns())
                pts += new
                selves.append(me)
                time.sleep(0.2)
            out[name] = (pts, selves)
    finally:
        for p in probes.values():
            p.close()
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        if cg is not None and cg.exists():
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    return out


@pytest.mark.parametrize("name", sorted(discover()))
def test_every_probe_emits_only_its_own_declared_measurements(emitted, name):
    """What each probe really emits: only measurements of its own bpf/<probe>/metrics.py
    (the runtime refuses any other and the poll fails), every declared tag on every
    point, declared fields of declared types; and it emitted something, so the check
    is not vacuous."""
    own = {m.name: m for m in catalog.probe_measurements()[name]}
    points, selves = emitted[name]
    assert [me.fields["poll_success"] for me in selves] == [1, 1], f"probe {name}: a poll failed or was refused"
    assert points, f"probe {name} emitted nothing while the host did what it observes"
    for p in points:
        assert p.measurement in own, f"probe {name} emitted {p.measurement}, not in bpf/{name}/metrics.py"
        assert set(p.tags) == own[p.measurement].tag_names, (name, p.measurement, set(p.tags))
        catalog.validate_point(p.measurement, p.tags, p.fields)


def test_a_foreign_or_undeclared_measurement_is_refused_and_fails_the_poll(tmp_path):
    """The runtime check the test above relies on, without a kernel: a decoder that
    emits another probe's measurement, or an undeclared tag, has those points dropped
    and its poll marked failed; its valid points are kept."""
    from conftest import make_config
    from sonde.ingest.output.lineproto import Point
    from sonde.ingest.runtime.probe import LoadedProbe, Probe

    emit = []

    class Decoder:
        def __init__(self, probe):
            pass

        def poll(self, ts):
            return list(emit), 0
    spec = Probe(name="oom", hooks=(), decoder=Decoder, kernel=False)
    probe = LoadedProbe(spec, make_config(tmp_path), None)
    ok = Point("oom_kills", {"host": "h"}, {"kills": 1, "lost_events": 0}, 1)
    emit[:] = [ok]
    points, me = probe.poll(1)
    assert points == [ok] and me.fields["poll_success"] == 1
    emit[:] = [ok, Point("disk_busy", {"host": "h", "disk": "sda"}, {"busy_us": 1}, 1),
               Point("oom_kills", {"host": "h", "pid": "1"}, {"kills": 1}, 1)]
    points, me = probe.poll(2)
    assert points == [ok] and me.fields["poll_success"] == 0


def test_undeclared_names_are_refused():
    with pytest.raises(CatalogError, match="not declared"):
        catalog.validate_point("tcp_bytes", {"host": "h"}, {"tx_bytes": 1})
    with pytest.raises(CatalogError, match="not declared"):
        catalog.validate_point("tcp_traffic", {"host": "h", "port": "80"}, {"tx_bytes": 1})
    with pytest.raises(CatalogError, match="no field"):
        catalog.validate_point("tcp_traffic", {"host": "h"}, {"tx_packets": 1})
    with pytest.raises(CatalogError, match="float value for a int field"):
        catalog.validate_point("tcp_traffic", {"host": "h"}, {"tx_bytes": 1.5})


def test_field_names_carry_units():
    for m in catalog.MEASUREMENTS.values():
        for f in m.fields:
            if f.unit in ("bytes", "seconds", "us"):
                assert f.name == f.unit or f.name.endswith("_" + f.unit), \
                    f"{m.name}.{f.name}: unit {f.unit} must be in the name"


def test_readme_config_reference_parses():
    import re

    from sonde.ingest import config

    text = (REPO / "README.md").read_text()
    block = re.search(r"## Config reference.*?```yaml\n(.*?)```", text, re.S).group(1)
    cfg = config.parse(block, "README.md")
    assert set(cfg.probes) <= set(discover())
    defaults = {name: config._PROBE_CONFIGS.get(name, config.ProbeConfig)() for name in cfg.probes}
    assert cfg == config.Config(host="web-1", probes=defaults), "README's config reference must list the defaults"
