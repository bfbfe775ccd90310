"""SIGHUP reloads the config file (vgpud/fleet.py, vgpud/reload.py): devices are added,
removed and changed without touching the others, and never from under an attached client.

Each test runs the daemon in-process on real UNIX sockets, rewrites its config file, raises
SIGHUP and waits for the "reloaded" (or "reload failed") line; the clients are the project's
own vfio-user client, which sees what a VMM would.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import struct
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

import protocol as p
from tests.daemon.test_signals import ENGINES, wait_for_event
from vgpud import daemon
from vgpud.client import VfioUserClient, VfioUserError
from vgpud.config import DaemonConfig, load_file, single_device
from vgpud.fleet import Fleet, ServedDevice
from vgpud.reload import ReloadPlan, plan

BAR4, CONFIG = 4, 7


def write_tray(path: Path, devices: dict[str, str], daemon_table: str = "") -> None:
    """``devices``: name -> extra TOML lines; each a 4 GiB gh200 at <dir>/<name>.sock with
    its memory in <dir>/mem-<name>, unless the extra lines say otherwise."""
    base = path.parent
    text = daemon_table
    for name, extra in devices.items():
        keys = {
            "name": f'"{name}"',
            "socket_path": f'"{base}/{name}.sock"',
            "memory_size": '"4GiB"',
            "backing_dir": f'"{base}/mem-{name}"',
        }
        for line in extra.splitlines():
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
        text += "[[device]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    path.write_text(text)


@dataclasses.dataclass
class Running:
    servers: list[ServedDevice]
    logs: list[MutableMapping[str, Any]]
    config: Path
    reloads: int = 0

    @property
    def names(self) -> list[str]:
        return [server.name for server in self.servers]

    async def reload(self, devices: dict[str, str] | None = None) -> MutableMapping[str, Any]:
        """Rewrite the file (``devices`` as for :func:`write_tray`), SIGHUP, and the
        "reloaded" line."""
        if devices is not None:
            write_tray(self.config, devices)
        self.reloads += 1
        signal.raise_signal(signal.SIGHUP)
        await wait_for_event(self.logs, "reloaded", count=self.reloads)
        return [e for e in self.logs if e["event"] == "reloaded"][-1]

    def socket(self, name: str) -> Path:
        return self.config.parent / f"{name}.sock"

    async def connect(self, name: str) -> VfioUserClient:
        return await VfioUserClient.connect(self.socket(name))


@asynccontextmanager
async def running(
    tmp_path: Path, devices: dict[str, str], engine: str = "python"
) -> AsyncIterator[Running]:
    config = tmp_path / "tray.toml"
    write_tray(config, devices)

    def load() -> DaemonConfig:
        return dataclasses.replace(load_file(config), engine=engine)

    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            servers = await nursery.start(functools.partial(daemon.run, load(), reload_config=load))
            yield Running(servers, logs, config)
            nursery.cancel_scope.cancel()


def usemem_at(tmp_path: Path, name: str, offset: int, size: int) -> bytes:
    with (tmp_path / f"mem-{name}" / "usemem").open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


# -- the plan --------------------------------------------------------------------------------


def _config(*names: str, **daemon_settings: Any) -> DaemonConfig:
    return DaemonConfig(
        tuple(single_device(socket_path=Path(f"/run/{n}.sock"), name=n) for n in names),
        **daemon_settings,
    )


def test_plan_matches_devices_by_name() -> None:
    running_config = _config("gpu0", "gpu1", "gpu2")
    changed = dataclasses.replace(running_config.devices[1], memory_size=8 << 30)
    wanted = dataclasses.replace(
        running_config, devices=(running_config.devices[0], changed, _config("gpu3").devices[0])
    )
    result = plan(running_config, wanted)
    assert [d.name for d in result.added] == ["gpu3"]
    assert [d.name for d in result.removed] == ["gpu2"]
    assert result.changed == ((running_config.devices[1], changed),)
    assert result.daemon_keys == ()
    assert not result.empty


def test_plan_of_the_same_file_is_empty_and_names_daemon_settings() -> None:
    assert plan(_config("gpu0"), _config("gpu0")) == ReloadPlan()
    result = plan(_config("gpu0"), _config("gpu0", log_level="debug", engine="libvfio-user"))
    assert result.empty
    assert result.daemon_keys == ("log_level", "engine")


# -- the daemon ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_device_added_while_another_serves_its_vm(tmp_path: Path, engine: str) -> None:
    async with (
        running(tmp_path, {"gpu0": ""}, engine) as daemon_,
        await daemon_.connect("gpu0") as gpu0,
    ):
        await gpu0.region_write(BAR4, 0x100, b"kept!!!!")
        reloaded = await daemon_.reload({"gpu0": "", "gpu1": 'profile = "gb200"'})
        assert reloaded["added"] == ["gpu1"]
        assert {"removed", "draining", "replaced", "kept", "failed"}.isdisjoint(reloaded)
        assert daemon_.names == ["gpu0", "gpu1"]
        # gpu0's session went on through the reload.
        assert await gpu0.region_read(BAR4, 0x100, 8) == b"kept!!!!"
        async with await daemon_.connect("gpu1") as gpu1:
            ids = struct.unpack("<HH", await gpu1.region_read(CONFIG, 0, 4))
            assert ids == (0x10DE, 0x2941)  # gb200
            await gpu1.region_write(BAR4, 0x100, b"new gpu!")
    assert usemem_at(tmp_path, "gpu1", 0x100, 8) == b"new gpu!"
    assert usemem_at(tmp_path, "gpu0", 0x100, 8) == b"kept!!!!"
    assert not daemon_.socket("gpu1").exists(), "removed at the stop like the others"


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_removed_device_serves_its_vm_until_it_leaves(tmp_path: Path, engine: str) -> None:
    async with running(tmp_path, {"gpu0": "", "gpu1": ""}, engine) as daemon_:
        gpu1 = await daemon_.connect("gpu1")
        async with gpu1:
            await gpu1.region_write(BAR4, 0x200, b"draining")
            reloaded = await daemon_.reload({"gpu0": ""})
            assert reloaded["draining"] == ["gpu1"] and "removed" not in reloaded
            # Its VM keeps the GPU; anyone else is told it is going.
            assert await gpu1.region_read(BAR4, 0x200, 8) == b"draining"
            with pytest.raises(VfioUserError, match="VERSION failed: No such device"):
                await daemon_.connect("gpu1")
            assert await gpu1.region_read(CONFIG, 0, 4) == b"\xde\x10\x42\x23"
        await wait_for_event(daemon_.logs, "device released")
        assert daemon_.names == ["gpu0"]
        assert not daemon_.socket("gpu1").exists()
        async with await daemon_.connect("gpu0") as gpu0:  # the other device never noticed
            await gpu0.region_read(CONFIG, 0, 4)
    assert usemem_at(tmp_path, "gpu1", 0x200, 8) == b"draining", "memory outlives the device"
    [released] = [e for e in daemon_.logs if e["event"] == "device released"]
    assert released["device"] == "gpu1"
    # Its share of the DMA-map budget went back to the devices left.
    [ready] = [e for e in daemon_.logs if e["event"] == "ready"]
    assert released["max_dma_maps"] > ready["max_dma_maps"] * 1.5


async def test_an_idle_removed_device_is_gone_when_the_reload_is_done(tmp_path: Path) -> None:
    async with running(tmp_path, {"gpu0": "", "gpu1": "", "gpu2": ""}) as daemon_:
        reloaded = await daemon_.reload({"gpu1": ""})
        assert reloaded["removed"] == ["gpu0", "gpu2"]
        assert daemon_.names == ["gpu1"]
        assert not daemon_.socket("gpu0").exists() and not daemon_.socket("gpu2").exists()
        assert (tmp_path / "mem-gpu0" / "usemem").exists(), "memory files kept"
        # The same files, served again: a device can come back with its memory.
        reloaded = await daemon_.reload({"gpu0": "", "gpu1": ""})
        assert reloaded["added"] == ["gpu0"]
        assert daemon_.names == ["gpu1", "gpu0"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_changed_device_waits_for_its_vm_to_leave(tmp_path: Path, engine: str) -> None:
    async with running(tmp_path, {"gpu0": ""}, engine) as daemon_:
        trapped = {"gpu0": "no_mmap = true"}
        async with await daemon_.connect("gpu0") as gpu0:
            await gpu0.region_write(BAR4, 0x300, b"same vm!")
            reloaded = await daemon_.reload(trapped)
            assert reloaded["kept"] == ["gpu0"] and "replaced" not in reloaded
            [warning] = [e for e in daemon_.logs if e["event"].startswith("device changed")]
            assert warning["settings"] == ["no_mmap"]
            assert await mappable(gpu0)
            assert await gpu0.region_read(BAR4, 0x300, 8) == b"same vm!"
        await daemon_.servers[0].wait_idle()
        reloaded = await daemon_.reload()  # the same file again, now the VM has gone
        assert reloaded["replaced"] == ["gpu0"]
        async with await daemon_.connect("gpu0") as gpu0:
            assert not await mappable(gpu0)
            assert await gpu0.region_read(BAR4, 0x300, 8) == b"same vm!"


async def mappable(client: VfioUserClient) -> bool:
    """Whether BAR4 comes with an fd to mmap (``no_mmap`` off)."""
    result = await client.region_info(BAR4)
    if result.fd is not None:
        os.close(result.fd)
    return bool(result.info.flags & p.RegionInfoFlags.MMAP)


async def test_a_device_that_cannot_start_changed_comes_back_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    async with running(tmp_path, {"gpu0": ""}) as daemon_:
        async with await daemon_.connect("gpu0") as gpu0:
            await gpu0.region_write(BAR4, 0x400, b"survived")
        await daemon_.servers[0].wait_idle()
        reloaded = await daemon_.reload({"gpu0": f'backing_dir = "{tmp_path}/a-file/mem"'})
        assert reloaded["failed"] == ["gpu0"] and reloaded["kept"] == ["gpu0"]
        [error] = [e for e in daemon_.logs if e["event"].startswith("device cannot start")]
        assert "a-file" in error["error"]
        async with await daemon_.connect("gpu0") as gpu0:
            assert await gpu0.region_read(BAR4, 0x400, 8) == b"survived"


async def test_a_device_back_with_its_old_settings_counts_in_the_budget(tmp_path: Path) -> None:
    """gpu1's new settings fail and it comes back as it was: two devices are served, so
    each client's share is still half the budget. It used to be shared out while gpu1 was
    down, over gpu0 alone, and never again: both clients got the whole of it."""
    (tmp_path / "a-file").write_text("")
    async with running(tmp_path, {"gpu0": "", "gpu1": ""}) as daemon_:
        [ready] = [e for e in daemon_.logs if e["event"] == "ready"]
        reloaded = await daemon_.reload(
            {"gpu0": "", "gpu1": f'backing_dir = "{tmp_path}/a-file/m"'}
        )
        assert reloaded["failed"] == ["gpu1"] and reloaded["kept"] == ["gpu1"]
        assert daemon_.names == ["gpu0", "gpu1"]
        assert reloaded["max_dma_maps"] == ready["max_dma_maps"]
        for name in ("gpu0", "gpu1"):
            async with await daemon_.connect(name) as client:
                assert client.server_capabilities is not None
                assert client.server_capabilities.max_dma_maps == ready["max_dma_maps"]


async def test_a_file_that_does_not_parse_changes_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, {"gpu0": "", "gpu1": ""}) as daemon_:
        daemon_.config.write_text('[[device]]\nname = "gpu0"\nmemory_size = "lots"\n')
        signal.raise_signal(signal.SIGHUP)
        await wait_for_event(daemon_.logs, "reload failed, nothing changed")
        [failed] = [e for e in daemon_.logs if e["event"] == "reload failed, nothing changed"]
        assert "memory_size" in failed["error"]
        assert daemon_.names == ["gpu0", "gpu1"]
        for name in ("gpu0", "gpu1"):
            async with await daemon_.connect(name) as client:
                await client.region_read(CONFIG, 0, 4)


async def test_a_file_nested_too_deeply_to_parse_changes_nothing(tmp_path: Path) -> None:
    """tomllib parses arrays by recursion: a file nested deeper than Python's stack raised
    RecursionError, which no reload caught, and the daemon died with every VM's GPU."""
    async with running(tmp_path, {"gpu0": ""}) as daemon_:
        daemon_.config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
        signal.raise_signal(signal.SIGHUP)
        await wait_for_event(daemon_.logs, "reload failed, nothing changed")
        [failed] = [e for e in daemon_.logs if e["event"] == "reload failed, nothing changed"]
        assert "nested too deeply" in failed["error"]
        async with await daemon_.connect("gpu0") as client:
            await client.region_read(CONFIG, 0, 4)


async def test_a_reload_that_fails_reading_its_file_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever reading the file raises, not only a ConfigError (the RecursionError above
    was one such bug): the reload fails, the devices go on being served."""
    async with running(tmp_path, {"gpu0": ""}) as daemon_:

        def broken(*_: object, **__: object) -> None:
            raise UnicodeEncodeError("ascii", "gpu\u00e9", 3, 4, "a locale without UTF-8")

        monkeypatch.setattr("vgpud.config.parse", broken)
        signal.raise_signal(signal.SIGHUP)
        await wait_for_event(daemon_.logs, "reload failed, nothing changed")
        assert daemon_.names == ["gpu0"]
        async with await daemon_.connect("gpu0") as client:
            await client.region_read(CONFIG, 0, 4)


async def test_daemon_settings_need_a_restart_and_say_so(tmp_path: Path) -> None:
    async with running(tmp_path, {"gpu0": ""}) as daemon_:
        write_tray(daemon_.config, {"gpu0": ""}, '[daemon]\nlog_level = "debug"\n')
        reloaded = await daemon_.reload()
        assert {"added", "removed", "replaced", "kept", "failed"}.isdisjoint(reloaded)
        [warning] = [e for e in daemon_.logs if e["event"].startswith("reload cannot change")]
        assert warning["settings"] == ["log_level"]


async def test_a_new_device_cannot_take_what_a_draining_one_holds(tmp_path: Path) -> None:
    """gpu1 renamed gpu2 while gpu1's VM is attached: the same socket path and memory
    directory would be two devices' at once (and the memory two VMs')."""
    async with running(tmp_path, {"gpu0": "", "gpu1": ""}) as daemon_:
        same_place = f'socket_path = "{tmp_path}/gpu1.sock"\nbacking_dir = "{tmp_path}/mem-gpu1"'
        async with await daemon_.connect("gpu1") as gpu1:
            reloaded = await daemon_.reload({"gpu0": "", "gpu2": same_place})
            assert reloaded["draining"] == ["gpu1"] and reloaded["failed"] == ["gpu2"]
            [error] = [e for e in daemon_.logs if e["event"] == "device not added"]
            assert "still device gpu1's" in error["error"]
            await gpu1.region_read(CONFIG, 0, 4)
        await wait_for_event(daemon_.logs, "device released")
        reloaded = await daemon_.reload()  # once it has gone, the next reload adds it
        assert reloaded["added"] == ["gpu2"]
        assert daemon_.names == ["gpu0", "gpu2"]


async def test_the_dma_map_budget_is_shared_out_again(tmp_path: Path) -> None:
    """Each device's clients get an equal share of the process's descriptors
    (vgpud/budget.py): two devices where there was one halve the next client's share."""
    async with running(tmp_path, {"gpu0": ""}) as daemon_:
        [ready] = [e for e in daemon_.logs if e["event"] == "ready"]
        async with await daemon_.connect("gpu0") as before:
            assert before.server_capabilities is not None
            assert before.server_capabilities.max_dma_maps == ready["max_dma_maps"]
            reloaded = await daemon_.reload({"gpu0": "", "gpu1": ""})
        assert reloaded["max_dma_maps"] < ready["max_dma_maps"] * 0.6
        for name in ("gpu0", "gpu1"):
            async with await daemon_.connect(name) as after:
                assert after.server_capabilities is not None
                assert after.server_capabilities.max_dma_maps == reloaded["max_dma_maps"]


async def test_sighups_during_a_reload_fold_into_one_more(tmp_path: Path) -> None:
    async with running(tmp_path, {"gpu0": ""}) as daemon_:
        write_tray(daemon_.config, {"gpu0": "", "gpu1": ""})
        for _ in range(3):  # no checkpoint between: all three come before the first reload
            signal.raise_signal(signal.SIGHUP)
        await wait_for_event(daemon_.logs, "reloaded")
        daemon_.reloads = 1
        write_tray(daemon_.config, {"gpu0": "", "gpu1": "", "gpu2": ""})
        await daemon_.reload()
        reloads = [e for e in daemon_.logs if e["event"] == "reloaded"]
        assert [e.get("added") for e in reloads] == [["gpu1"], ["gpu2"]]
        assert not any(e["event"] == "stopping" for e in daemon_.logs)


async def test_a_device_on_an_inherited_socket_is_left_alone(tmp_path: Path) -> None:
    """Its socket is the service manager's (or the ``--fd`` caller's): a reload neither
    closes it nor serves another device on it."""
    config = tmp_path / "tray.toml"
    write_tray(config, {"gpu0": ""})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "gpu0.sock"))
    listener.listen(1)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            load = functools.partial(load_file, config)
            servers = await nursery.start(
                functools.partial(
                    daemon.run, load(), inherited_fd=listener.detach(), reload_config=load
                )
            )
            daemon_ = Running(servers, logs, config)
            reloaded = await daemon_.reload({"gpu1": ""})  # gpu0 renamed: removed, gpu1 added
            assert reloaded["kept"] == ["gpu0"] and reloaded["added"] == ["gpu1"]
            assert "removed" not in reloaded and "draining" not in reloaded
            for name in ("gpu0", "gpu1"):
                async with await daemon_.connect(name) as client:
                    await client.region_read(CONFIG, 0, 4)
            nursery.cancel_scope.cancel()
    assert (tmp_path / "gpu0.sock").exists(), "an inherited socket is not ours to remove"


async def test_a_bug_in_a_reload_leaves_the_devices_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping the daemon over it would take every VM's GPU (QEMU does not reconnect)."""
    async with (
        running(tmp_path, {"gpu0": ""}) as daemon_,
        await daemon_.connect("gpu0") as gpu0,
    ):
        with monkeypatch.context() as patch:
            patch.setattr(Fleet, "reload", _broken_reload)
            signal.raise_signal(signal.SIGHUP)
            await wait_for_event(daemon_.logs, FAILED_PART_WAY)
        await gpu0.region_read(CONFIG, 0, 4)
        reloaded = await daemon_.reload({"gpu0": "", "gpu1": ""})
        assert reloaded["added"] == ["gpu1"]


FAILED_PART_WAY = "reload failed part-way; the devices served go on being served"


async def _broken_reload(self: Fleet, wanted: DaemonConfig) -> None:
    raise RuntimeError("a bug")
