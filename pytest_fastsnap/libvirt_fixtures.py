"""Fixtures for the libvirt suite (registered by the plugin next to ``fixtures``).

``private_libvirt`` (session; one per xdist worker): a :class:`PrivateLibvirt`
under the session directory, skipping with the exact reason when libvirt is
missing, too old, or its daemons do not start.  ``libvirt_tiny_domain``: a
factory of running tiny-guest domains, destroyed after the test.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_fastsnap.config import FastsnapConfig
from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_kernel
from pytest_fastsnap.libvirtd import (
    LibvirtDomain,
    LibvirtError,
    PrivateLibvirt,
    libvirt_version,
    unavailable_reason,
)
from pytest_fastsnap.plugin_state import CONFIG_KEY, SESSION_DIR_KEY

TinyDomainFactory = Callable[..., tuple[LibvirtDomain, TinyGuest]]


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not config.stash[CONFIG_KEY].enabled:
        return []
    why = unavailable_reason()
    return [f"fastsnap: libvirt {libvirt_version()} (private libvirtd per session)" if not why
            else f"fastsnap: libvirt suite skipped: {why}"]


@pytest.fixture(scope="session")
def private_libvirt(pytestconfig: pytest.Config, fastsnap_config: FastsnapConfig
                    ) -> Iterator[PrivateLibvirt]:
    """Private virtlogd + libvirtd for this session (see pytest_fastsnap.libvirtd)."""
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    root = Path(pytestconfig.stash[SESSION_DIR_KEY]) / f"libvirt-{os.getpid()}"
    libvirt = PrivateLibvirt(root)
    try:
        libvirt.start()
    except LibvirtError as err:
        libvirt.stop()
        pytest.skip(f"private libvirtd could not start: {err}")
    yield libvirt
    leftovers = libvirt.stop()
    assert not leftovers, f"processes left in the private libvirt namespace: {leftovers}"


@pytest.fixture
def libvirt_tiny_domain(private_libvirt: PrivateLibvirt, fastsnap_workdir: Path
                        ) -> Iterator[TinyDomainFactory]:
    """``libvirt_tiny_domain(params=TinyParams(), mem_mib=64)`` -> (domain, TinyGuest),
    booted and READY; every domain is destroyed after the test."""
    made: list[LibvirtDomain] = []
    counter = itertools.count(1)

    def make(params: TinyParams | None = None, mem_mib: int = 64
             ) -> tuple[LibvirtDomain, TinyGuest]:
        params = params or TinyParams()
        name = f"fs{os.getpid()}-{next(counter)}"
        domain = LibvirtDomain.tiny(private_libvirt, name, fastsnap_workdir, tiny_kernel(),
                                    params.cmdline(), mem_mib=mem_mib)
        made.append(domain)
        domain.create()
        guest = TinyGuest(domain, params)  # type: ignore[arg-type]  # duck-typed machine
        guest.wait_ready(timeout=60)
        return domain, guest

    yield make
    for domain in made:
        domain.close()
