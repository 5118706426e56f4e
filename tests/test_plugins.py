"""Connector plugins (connectors/registry.py register/load_plugins, worker.py --plugin)
and the synthetic connector of the scale benchmark (tests/harness/synthetic.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import blockstream
from connectors import registry
from connectors.base import PermanentError
from tests.harness import replay, synthetic
from tests.harness.protect import protection_spec, start_protection, status, sync_now, wait_first_point
from tests.harness.stack import REPO, transcend_stack
from transcend.api import ReplicationStatus
from transcend.catalog import Catalog
from transcend.client import codec_keys
from transcend.models import (
    ChangeKind,
    FreezeOptions,
    PlatformInfo,
    PlatformKind,
    PlatformSpec,
    PointDisk,
    PointMeta,
    RecoveryPoint,
)
from transcend.secrets import SecretBox


def info(kind: PlatformKind, config: dict[str, Any] | None = None, name: str = "p") -> PlatformInfo:
    return PlatformInfo(name=name, kind=kind, site="local", config=config or {})


@pytest.fixture
def nutanix_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throw-away plugin module registering a source for the nutanix kind."""
    (tmp_path / "fake_plugin_mod.py").write_text(
        "from connectors.registry import register\n"
        "class FakeSource:\n"
        "    def __init__(self, info, secret):\n"
        "        self.info, self.secret = info, secret\n"
        "register('nutanix', FakeSource)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fake_plugin_mod"
    registry.unregister(PlatformKind.NUTANIX)
    registry._loaded.discard("fake_plugin_mod")
    sys.modules.pop("fake_plugin_mod", None)


def test_builtin_and_unknown_kinds_unchanged() -> None:
    with pytest.raises(PermanentError, match="no source connector in this version"):
        registry.source_for(info(PlatformKind.AZURE), {})
    with pytest.raises(PermanentError, match="no target connector in this version"):
        registry.target_for(info(PlatformKind.AZURE), {})
    with pytest.raises(ValueError, match="built in"):
        registry.register(PlatformKind.KVM, synthetic.SyntheticSource)


def test_synthetic_plugin_registers_both_roles() -> None:
    assert registry.load_plugins(["tests.harness.synthetic"]) in ([], ["tests.harness.synthetic"])
    cfg = {"root": "/nonexistent", "socket": "/nonexistent.sock"}
    assert isinstance(registry.source_for(info(PlatformKind.SYNTHETIC, cfg), {}), synthetic.SyntheticSource)
    assert isinstance(registry.target_for(info(PlatformKind.SYNTHETIC, cfg), {}), synthetic.SyntheticTarget)
    registry.register(PlatformKind.SYNTHETIC, synthetic.SyntheticSource)  # same factory: no-op
    with pytest.raises(ValueError, match="already registered"):
        registry.register(PlatformKind.SYNTHETIC, lambda i, s: synthetic.SyntheticSource(i, s))


def test_plugins_from_environment(nutanix_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.PLUGINS_ENV, f" {nutanix_plugin}, ")
    monkeypatch.setattr(registry, "_env_loaded", False)
    assert registry.plugin_modules_from_env() == [nutanix_plugin]
    src = registry.source_for(info(PlatformKind.NUTANIX), {"k": "v"})  # imported on first use
    assert type(src).__name__ == "FakeSource" and src.secret == {"k": "v"}  # type: ignore[attr-defined]
    with pytest.raises(PermanentError, match="no target connector"):
        registry.target_for(info(PlatformKind.NUTANIX), {})


def test_a_plugin_kind_need_not_be_known_to_this_package(tmp_path: Path) -> None:
    """Kinds are open: a plugin's own kind is registered, listed, stored in the catalog
    and read back as it was; a malformed one is refused before anything is stored."""

    class AcmeSource:
        def __init__(self, info: PlatformInfo, secret: dict[str, str]) -> None:
            self.info = info

    registry.register("acme-cloud", AcmeSource)  # type: ignore[arg-type]
    try:
        assert registry.known_kinds()["acme-cloud"] == (True, False)
        assert registry.known_kinds()["kvm"] == (True, True)
        src = registry.source_for(PlatformInfo(name="a", kind="acme-cloud", site="local",
                                               config={}), {})
        assert isinstance(src, AcmeSource)
        with pytest.raises(PermanentError, match=r"supported as target: .*kvm"):
            registry.target_for(PlatformInfo(name="a", kind="acme-cloud", site="local", config={}), {})
        cat = Catalog(f"sqlite:///{tmp_path}/catalog.sqlite", SecretBox([SecretBox.generate_key()]))
        try:
            cat.add_platform(PlatformSpec(name="acme-1", kind="acme-cloud", config={"x": "1"}))
            assert cat.get_platform("acme-1").kind == "acme-cloud"
            with pytest.raises(ValueError, match="kind"):
                PlatformSpec(name="bad", kind="Acme Cloud")
            assert [p.name for p in cat.list_platforms()] == ["acme-1"]
        finally:
            cat.close()
    finally:
        registry.unregister("acme-cloud")
    with pytest.raises(ValueError, match="lower-case"):
        registry.register("Acme", AcmeSource)  # type: ignore[arg-type]


def test_bad_plugin_module_is_named() -> None:
    with pytest.raises(RuntimeError, match="no_such_plugin_module"):
        registry.load_plugins(["no_such_plugin_module"])
    proc = subprocess.run([sys.executable, str(REPO / "worker.py"), "--plugin", "no_such_plugin_module"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "connector plugin 'no_such_plugin_module' could not be imported" in proc.stderr


def test_synthetic_data_path(tmp_path: Path) -> None:
    """Two cycles (full, incremental) by hand through the real NBD servers and blockstream;
    each point holds exactly the source's content at its generation."""
    with synthetic.synthetic_servers(tmp_path) as srv:
        src_cfg = srv.source_config(disk_mib=1, data_kib=128, blocks_per_cycle=3)
        source = synthetic.SyntheticSource(info(PlatformKind.SYNTHETIC, src_cfg, "s"), {})
        target = synthetic.SyntheticTarget(info(PlatformKind.SYNTHETIC, srv.target_config(), "t"), {})
        wl = source.workload("vm-1")
        target.prepare("prot", wl.disks)
        since: dict[str, object] = {}
        last: RecoveryPoint | None = None
        manifest = blockstream.zero_manifest(1 << 20, 65536)
        for seq, cycle in enumerate(["c1", "c2"], start=1):
            frozen = source.freeze("prot", cycle, [wl], since, FreezeOptions())  # type: ignore[arg-type]
            assert frozen.handle == source.freeze("prot", cycle, [wl], since, FreezeOptions()).handle  # type: ignore[arg-type]
            ch = frozen.changes("vda")
            assert ch.summary.kind == (ChangeKind.FULL if seq == 1 else ChangeKind.INCREMENTAL)
            staging = target.begin("prot", cycle, wl.disks, last)
            extents = [blockstream.Extent(e.offset, e.length, e.zero) for e in ch.extents]
            blockstream.Stream(frozen.export("vda").uri, staging.endpoint("vda").uri, extents,
                               disk_size=1 << 20, manifest=manifest, block_size=65536).run()
            (loc,) = staging.commit(PointMeta(cycle_id=cycle, instant=frozen.handle.instant,
                                              block_size=65536, kind=ch.summary.kind))
            frozen.release(True)
            gen = frozen.handle.data["gen"]
            assert gen == seq
            expected = synthetic.expected_image("vm-1", gen, src_cfg)
            assert Path(loc).read_bytes() == expected
            assert bytes(manifest) == bytes(blockstream.hash_blocks(expected, 65536))
            if seq == 2:  # only the blocks of generation 2 were read
                assert ch.summary.data_bytes <= 3 * 65536
            # the point is readable through Target.open
            last = RecoveryPoint(id=cycle, protection="prot", seq=seq, instant=frozen.handle.instant,
                                 committed_at=datetime.now(UTC),
                                 disks=[PointDisk(disk="vda", size=1 << 20, location=loc, block_size=65536)])
            assert target.open(last, "vda").uri.endswith(f"socket={srv.target_socket}")
            since = {c.disk: c for c in frozen.new_checkpoints()}
        assert not list((tmp_path / "src" / "snap").iterdir())  # released


# Set to a directory (tests/histories/<version>) to keep this test's histories as
# replay fixtures for the versions after it.
RECORD_ENV = "TRANSCEND_RECORD_HISTORIES"


def test_synthetic_protection_in_a_real_worker(tmp_path: Path) -> None:
    """The worker process loads the plugin (TRANSCEND_PLUGINS) and runs real cycles; its
    workflows' histories replay."""
    with synthetic.synthetic_servers(tmp_path / "data") as srv, \
            transcend_stack(tmp_path / "home", workers=0) as stack:
        stack.env["TRANSCEND_PLUGINS"] = "tests.harness.synthetic"
        stack.start_worker()
        cat = stack.catalog()
        src_cfg = srv.source_config(disk_mib=1, data_kib=64)
        cat.add_platform(PlatformSpec(name="syn-src", kind=PlatformKind.SYNTHETIC, config=src_cfg))
        cat.add_platform(PlatformSpec(name="syn-dst", kind=PlatformKind.SYNTHETIC,
                                      config=srv.target_config()))

        async def run() -> None:
            client = await stack.client()
            handle = await start_protection(client, protection_spec("syn-1", "vm-a", "syn-src", "syn-dst"))
            st = await wait_first_point(handle, timeout=120)
            assert st.cycles_failed == 0, (st.last_error, stack.worker_log_tail())
            st = await sync_now(handle, timeout=120)
            assert st.cycles_failed == 0, (st.last_error, stack.worker_log_tail())
            assert (await status(handle)).cycles_ok == 2
            # the operator's updates, so that their code paths are in the histories
            await handle.execute_update("pause", result_type=ReplicationStatus)
            await handle.execute_update("resume", result_type=ReplicationStatus)
            await handle.execute_update("remove", result_type=ReplicationStatus)
            await handle.result()
            # Every history this version wrote replays with this version's code (the
            # determinism check; tests/test_replay.py replays older versions' histories).
            histories = await replay.fetch_all(client)
            assert {h.workflow_id.split("/")[0] for h in histories} >= {"replication", "cycle"}, \
                [h.workflow_id for h in histories]
            await replay.replay(histories, codec_keys(stack.settings))
            if os.environ.get(RECORD_ENV):
                replay.record(histories, codec_keys(stack.settings)[0], Path(os.environ[RECORD_ENV]))

        asyncio.run(run())
        point = cat.latest_point("syn-1")
        assert point is not None and point.kind == ChangeKind.INCREMENTAL
        gen = int(cat.checkpoints("syn-1")["vda"].token.removeprefix("gen-"))
        assert gen == 2
        data = Path(point.disks[0].location).read_bytes()
        want = synthetic.expected_image("vm-a", gen, src_cfg)
        assert hashlib.sha256(data).digest() == hashlib.sha256(want).digest()
        assert "connector plugins loaded: tests.harness.synthetic" in stack.worker_log_tail(20000)
