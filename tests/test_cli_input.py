"""The CLI with Temporal down and with bad input (issue #16): one line saying what was
wrong and what to do, exit code 2, no traceback, and nothing started or stored.

Temporal's address points at a closed port, so a command that reached Temporal would
fail with the connection error instead of the refusal the test expects: the refusals
happen before anything is started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from temporal.devserver import free_port
from tests.harness.seed import seed_web_protection
from transcend.catalog import Catalog
from transcend.cli import main
from transcend.config import settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TRANSCEND_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSCEND_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("TRANSCEND_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")  # nobody there
    settings.cache_clear()
    seed_web_protection(tmp_path)
    try:
        yield tmp_path
    finally:
        settings.cache_clear()


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), \
        f"{args}: {r.exception!r}"
    return r.exit_code, r.stdout, r.stderr


def test_temporal_down_is_one_line_and_status_shows_the_catalog(home: Path) -> None:
    code, out, err = cli("status")
    assert code == 2, (out, err)
    assert "web" in out and "src->dst" in out and "(live state unknown)" in out, out
    assert "live state unknown: cannot reach Temporal at 127.0.0.1:" in err, err
    assert "Traceback" not in out + err
    for args in (["sync", "web"], ["verify", "some-point"], ["pause", "web"]):
        code, out, err = cli(*args)
        assert code == 2 and "cannot reach Temporal" in err and "transcend server" in err, \
            (args, out, err)


def test_wrong_state_and_unknown_names_are_refused_before_anything_starts(home: Path) -> None:
    code, out, err = cli("failback", "web", "--no-wait")
    assert code == 2 and "started" not in out, (out, err)
    assert "cannot fail back protection 'web'" in err and "only a failed-over" in err, err
    code, out, err = cli("failover", "nope", "--no-wait")
    assert code == 2 and "started" not in out, (out, err)
    assert "nope" in err and "cannot reach Temporal" not in err, err
    code, out, err = cli("migrate", "nope", "--no-wait")
    assert code == 2 and "nope" in err and "cannot reach Temporal" not in err, err


@pytest.mark.parametrize(("args", "says"), [
    (["--bandwidth", "abc"], "'abc' is not a size"),
    (["--retention", "all 4h, all 2h"], "overlap"),
    (["--retention", "hourly 2d, daily 1d"], "keeps nothing"),
    (["--rpo", "-5m"], "not a duration"),
    (["--connections", "0"], "connections: must be greater than or equal to 1, got 0"),
])
def test_bad_protect_options_name_what_is_wrong(home: Path, args: list[str], says: str) -> None:
    code, out, err = cli("protect", "db", "--source", "src", "--vm", "vm1", "--target", "dst",
                         "--no-wait", *args)
    assert code == 2 and says in err, (args, out, err)
    assert "errors.pydantic.dev" not in err and "could not convert" not in err, err
    cat = Catalog.from_settings()
    try:
        assert [p.name for p in cat.list_protections()] == ["web"]  # nothing registered
    finally:
        cat.close()


def test_platform_add_names_the_field(home: Path) -> None:
    code, _out, err = cli("platform", "add", "bad", "--kind", "Acme Cloud")
    assert code == 2 and "kind: must match" in err and "errors.pydantic.dev" not in err, err
