"""A platform's config is checked before it is saved (issue #16): a misspelt key is
refused listing the known ones, a malformed value says what is allowed, and
``platform check`` / ``platform add --check`` connect with it first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from connectors import registry
from connectors.check import check_platform
from tests.harness import synthetic  # noqa: F401  (registers the synthetic kind)
from transcend.catalog import Catalog
from transcend.cli import main
from transcend.config import settings
from transcend.models import PlatformInfo


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSCEND_CONFIG", str(tmp_path / "none.toml"))
    settings.cache_clear()
    yield tmp_path
    settings.cache_clear()


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def saved(home: Path) -> list[str]:
    cat = Catalog.from_settings()
    try:
        return [p.name for p in cat.list_platforms()]
    finally:
        cat.close()


def test_each_connectors_config_is_validated() -> None:
    registry.validate_config("kvm", {"uri": "qemu+ssh://root@host/system", "root": "/srv/r"})
    with pytest.raises(ValueError, match=r"unknown config key 'rooot' for a kvm platform; "
                                         r"known: cache, domain_type, min_free_bytes, root"):
        registry.validate_config("kvm", {"rooot": "/srv/r"})
    with pytest.raises(ValueError, match=r"uri: 'qemu//system' is not a libvirt URI"):
        registry.validate_config("kvm", {"uri": "qemu//system"})
    with pytest.raises(ValueError, match=r"domain_type: .*'qemu' or 'kvm'"):
        registry.validate_config("kvm", {"domain_type": "xen"})
    registry.validate_config("vmware", {"host": "vc", "port": "443", "insecure": "true"})
    with pytest.raises(ValueError, match=r"port: .*integer"):
        registry.validate_config("vmware", {"host": "vc", "port": "https"})
    with pytest.raises(ValueError, match=r"unknown config key 'datastor'"):
        registry.validate_config("vmware", {"host": "vc", "datastor": "ds1"})
    # a plugin that declares no model: its config is its own business
    registry.validate_config("synthetic", {"anything": "goes"})


def test_platform_add_refuses_bad_config_and_saves_nothing(home: Path) -> None:
    code, _, err = cli("platform", "add", "p1", "--kind", "kvm", "--config", "rooot=/srv/r")
    assert code == 2 and "unknown config key 'rooot'" in err and "known:" in err, err
    code, _, err = cli("platform", "add", "p1", "--kind", "kvm", "--config", "uri=qemu//system")
    assert code == 2 and "not a libvirt URI" in err, err
    assert saved(home) == []
    code, _, err = cli("platform", "add", "p1", "--kind", "kvm", "--config",
                       f"root={home / 'replicas'}", "--config", "uri=test:///default")
    assert code == 0, err
    assert saved(home) == ["p1"]


def test_platform_check_connects_with_the_saved_config(home: Path) -> None:
    # libvirt's test driver answers in-process: the check's real connection, no daemon
    code, _, err = cli("platform", "add", "lab", "--kind", "kvm", "--config", "uri=test:///default",
                       "--config", f"root={home / 'replicas'}", "--check")
    assert code == 0, err
    code, out, err = cli("platform", "check", "lab")
    assert code == 0, (out, err)
    assert "lab as source: ok" in out and "at test:///default" in out and "domain(s)" in out, out
    assert "lab as target: ok" in out and f"replica root {home / 'replicas'}: writable" in out, out
    # nobody listens there: the source's check fails, says where, and --check saves nothing
    code, out, err = cli("platform", "add", "gone", "--kind", "kvm", "--config",
                         "uri=qemu+tcp://127.0.0.1:1/system", "--config", f"root={home / 'r2'}",
                         "--check")
    assert code == 2 and "gone as source: FAILED" in out and "cannot connect to libvirt" in out, out
    assert "gone" not in saved(home)
    # a root that cannot be a directory (a file is in the way)
    (home / "afile").write_text("x")
    results = check_platform(PlatformInfo(name="bad", kind="kvm", site="local",
                                          config={"uri": "test:///default",
                                                  "root": str(home / "afile" / "r")}), {})
    by_role = {r.role: r for r in results}
    assert by_role["source"].ok and not by_role["target"].ok, results
    assert "cannot be created" in by_role["target"].lines[0], results
