"""Capability conflicts: mapped-ram against every other migration capability
and the parameters that matter, in both orders and in one call.

Expectations come from the binary under test: a capability is first set alone
on a fresh QEMU; only the documented mapped-ram conflicts may turn an accepted
capability into a refusal, and a refusal must leave the state as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from pytest_fastsnap.fixtures import VmFactory
from pytest_fastsnap.plugin import record_matrix
from pytest_fastsnap.plugin_state import CONFIG_KEY, PROBE_KEY
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.migration import file_uri
from pytest_fastsnap.qemu.probe import POSTCOPY_CONFLICT, QemuProbe
from pytest_fastsnap.qemu.qmp import QMPCommandError

XBZRLE_CONFLICT = "Mapped-ram migration is incompatible with xbzrle"
MULTIFD_PARAM_CONFLICT = "Mapped-ram only available for non-compressed non-TLS multifd migration"
SEEKABLE = "Migration requires seekable transport (e.g. file)"
MULTI_CHANNEL = "Migration requires multi-channel URIs (e.g. tcp)"

# Used when --fastsnap is off (everything is skipped then) so collection is stable.
_FALLBACK_CAPS = ("auto-converge", "multifd", "postcopy-ram", "xbzrle")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "capability" in metafunc.fixturenames:
        config = metafunc.config
        if config.stash[CONFIG_KEY].enabled:
            caps = sorted(c for c in config.stash[PROBE_KEY].capabilities if c != "mapped-ram")
        else:
            caps = list(_FALLBACK_CAPS)
        metafunc.parametrize("capability", caps)


def expected_conflict(capability: str, probe: QemuProbe) -> str | None:
    """The error text mapped-ram must give for *capability*, or None if compatible."""
    if capability == "xbzrle":
        return XBZRLE_CONFLICT
    if capability == "postcopy-ram" and not probe.fast_load:
        return POSTCOPY_CONFLICT
    return None


def _set(vm: QemuMachine, caps: Mapping[str, bool]) -> str | None:
    """Set *caps* in one call; return QEMU's error text or None."""
    try:
        vm.qmp("migrate-set-capabilities", capabilities=[
            {"capability": k, "state": v} for k, v in caps.items()])
    except QMPCommandError as err:
        return err.desc
    return None


def _caps(vm: QemuMachine) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in vm.qmp("query-migrate-capabilities")}


def _params(vm: QemuMachine) -> dict[str, Any]:
    return dict(vm.qmp("query-migrate-parameters"))


def test_mapped_ram_pair(vm_factory: VmFactory, qemu_probe: QemuProbe, capability: str,
                         request: pytest.FixtureRequest) -> None:
    alone_vm = vm_factory(name="alone", paused=True)
    alone = _set(alone_vm, {capability: True})
    if alone is not None:
        # Refused on its own (a dependency such as return-path, or host support);
        # with mapped-ram it must still be refused, and mapped-ram stay off.
        record_matrix(request, capability, "alone", "refused")
    else:
        record_matrix(request, capability, "alone", "ok")

    conflict = expected_conflict(capability, qemu_probe)
    outcomes = {}
    for order in ("one call", "mapped-ram first", "capability first"):
        vm = vm_factory(name="pair", paused=True)
        if order == "one call":
            before = _caps(vm)
            err = _set(vm, {"mapped-ram": True, capability: True})
        else:
            first, second = (("mapped-ram", capability) if order == "mapped-ram first"
                             else (capability, "mapped-ram"))
            first_err = _set(vm, {first: True})
            if first_err is not None:
                assert first == capability and alone is not None, first_err
                err = first_err
                before = _caps(vm)
            else:
                before = _caps(vm)
                err = _set(vm, {second: True})
        after = _caps(vm)
        outcomes[order] = err
        if err is not None:
            assert after == before, f"refused {order} but the capabilities changed"
        else:
            assert after["mapped-ram"] and after[capability], f"accepted {order}, not set"

    if alone is not None:
        assert outcomes["one call"] is not None and outcomes["mapped-ram first"] is not None
        return
    if conflict is None:
        assert outcomes == dict.fromkeys(outcomes), f"compatible capability refused: {outcomes}"
        record_matrix(request, capability, "+mapped-ram", "ok")
    else:
        assert outcomes == dict.fromkeys(outcomes, conflict), outcomes
        record_matrix(request, capability, "+mapped-ram", "refused")


@pytest.mark.qemu_feature("fast-snapshot-load")
def test_fast_load_refuses_multifd(vm_factory: VmFactory) -> None:
    """Fast snapshot load is documented without multifd: the binary must not
    accept postcopy-ram + mapped-ram + multifd on an incoming QEMU."""
    vm = vm_factory(name="dst", incoming="defer", paused=True)
    err = _set(vm, {"mapped-ram": True, "postcopy-ram": True, "multifd": True})
    assert err is not None, "postcopy-ram + mapped-ram + multifd accepted"
    assert _caps(vm)["multifd"] is False


@pytest.mark.parametrize("param,value", [("multifd-compression", "zlib"),
                                          ("tls-creds", "tls0")])
@pytest.mark.parametrize("order", ["capabilities first", "parameter first"])
@pytest.mark.qemu_defect(
    affected=">=9.0", fixed_in="none known as of QEMU master 2026-08",
    reason="migrate-set-parameters checks the mapped-ram multifd rule against the current "
           "parameters, not the ones being set, so compression/TLS slip in and later "
           "parameter changes are refused instead")
def test_multifd_parameter_rule(vm_factory: VmFactory, param: str, value: str, order: str,
                                request: pytest.FixtureRequest) -> None:
    """mapped-ram + multifd must refuse multifd compression and TLS in either order."""
    vm = vm_factory(name="src", paused=True)
    caps = {"mapped-ram": True, "multifd": True}
    if order == "capabilities first":
        assert _set(vm, caps) is None
        before = _params(vm)
        with pytest.raises(QMPCommandError) as err:
            vm.qmp("migrate-set-parameters", **{param: value})
        assert err.value.desc == MULTIFD_PARAM_CONFLICT
        assert _params(vm) == before
    else:
        vm.qmp("migrate-set-parameters", **{param: value})
        before = _caps(vm)
        assert _set(vm, caps) == MULTIFD_PARAM_CONFLICT
        assert _caps(vm) == before
    record_matrix(request, f"multifd+{param}", "+mapped-ram", "refused")


@pytest.mark.parametrize("param,value", [("direct-io", True), ("zero-page-detection", "none"),
                                          ("multifd-channels", 4)])
def test_compatible_parameters(vm_factory: VmFactory, param: str, value: Any,
                               request: pytest.FixtureRequest) -> None:
    vm = vm_factory(name="src", paused=True)
    assert _set(vm, {"mapped-ram": True, "multifd": True}) is None
    try:
        vm.qmp("migrate-set-parameters", **{param: value})
    except QMPCommandError as err:
        if param == "direct-io" and err.desc == "No build-time support for direct-io":
            pytest.skip(f"{vm.binary} was built without O_DIRECT support")
        raise
    assert _params(vm)[param] == value
    record_matrix(request, f"multifd+{param}", "+mapped-ram", "ok")


def test_mapped_ram_needs_seekable_transport(vm_factory: VmFactory,
                                             fastsnap_workdir: Any) -> None:
    vm = vm_factory(name="src", paused=True)
    assert _set(vm, {"mapped-ram": True}) is None
    for uri in (f"unix:{fastsnap_workdir}/m.sock", "tcp:127.0.0.1:1", "exec:cat > /dev/null"):
        with pytest.raises(QMPCommandError) as err:
            vm.qmp("migrate", uri=uri)
        assert err.value.desc == SEEKABLE, uri
    assert vm.qmp("query-migrate").get("status") in (None, "none")


def test_multifd_over_file_needs_mapped_ram(vm_factory: VmFactory,
                                            fastsnap_workdir: Any) -> None:
    vm = vm_factory(name="src", paused=True)
    assert _set(vm, {"multifd": True}) is None
    path = fastsnap_workdir / "x.img"
    with pytest.raises(QMPCommandError) as err:
        vm.qmp("migrate", uri=file_uri(path))
    assert err.value.desc == MULTI_CHANNEL
    assert not path.exists() or path.stat().st_size == 0


def test_compression_never_reaches_a_file(vm_factory: VmFactory,
                                          fastsnap_workdir: Any) -> None:
    """Whichever check lets multifd compression through, the save itself must
    refuse it: a compressed mapped-ram file would be unreadable."""
    vm = vm_factory(name="src", paused=True)
    vm.qmp("migrate-set-parameters", **{"multifd-compression": "zlib"})
    if _set(vm, {"mapped-ram": True, "multifd": True}) is not None:
        return  # refused at set time: the correct, stricter behaviour
    path = fastsnap_workdir / "z.img"
    with pytest.raises(QMPCommandError) as err:
        vm.qmp("migrate", uri=file_uri(path))
    assert "compression" in err.value.desc and "mapped-ram" in err.value.desc, err.value.desc
    assert not path.exists() or path.stat().st_size == 0


@pytest.mark.qemu_defect(
    affected=">=9.0", fixed_in="none known as of QEMU master 2026-08",
    reason="once multifd-compression slipped in beside mapped-ram, setting it back to "
           "'none' is refused by the same stale check; only turning mapped-ram off recovers")
def test_slipped_in_compression_can_be_undone(vm_factory: VmFactory) -> None:
    vm = vm_factory(name="src", paused=True)
    assert _set(vm, {"mapped-ram": True, "multifd": True}) is None
    try:
        vm.qmp("migrate-set-parameters", **{"multifd-compression": "zlib"})
    except QMPCommandError:
        return  # refused up front: nothing to undo
    vm.qmp("migrate-set-parameters", **{"multifd-compression": "none"})
    assert _params(vm)["multifd-compression"] == "none"
