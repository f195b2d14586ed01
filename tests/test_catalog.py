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
    # Decoded probes (spec.decoder) are checked point by point at poll time:
    # LoadedProbe.poll validates every point and reports poll_success=0 otherwise.
    for m in spec.maps:
        meas = catalog.MEASUREMENTS.get(m.map)
        assert meas is not None, f"probe {name}: map {m.map} is not a catalog measurement"
        assert set(m.fields) <= meas.field_names, f"probe {name}: undeclared fields {set(m.fields) - meas.field_names}"
        assert {"host", "pid", "comm"} <= meas.tag_names


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
    assert cfg == config.Config(host="web-1", probes={name: config.ProbeConfig() for name in cfg.probes}), "README's config reference must list the defaults"
