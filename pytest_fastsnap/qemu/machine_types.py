"""Which machine type every guest uses when two QEMU binaries take part.

``-machine q35`` is an alias that each binary resolves to its own newest type
(10.0.2: ``pc-q35-10.0``, 10.2.2: ``pc-q35-10.2``); a destination refuses a
stream whose configuration record names another type ("Machine type received
is 'pc-q35-10.0' and local is 'pc-q35-10.2'").  So when source and destination
binaries differ, every alias is pinned to a versioned type both binaries have:
by default the older binary's resolution of the alias (as QEMU's own
migration-compat tests do), or what ``--fastsnap-machine`` names.

``microvm`` has no versioned types; it is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_fastsnap.qemu.probe import QemuProbe

# Aliases with versioned types, and the prefix of those types.
FAMILIES = {"q35": "pc-q35-", "pc": "pc-i440fx-"}


class MachineTypeError(ValueError):
    """--fastsnap-machine names a type one of the binaries lacks, or is malformed."""


@dataclass(frozen=True)
class MachineTypes:
    """Alias -> versioned type; an empty mapping leaves aliases to each binary."""

    pinned: dict[str, str] = field(default_factory=dict)
    why: str = "aliases as each binary resolves them (source and destination are one binary)"

    def resolve(self, machine: str) -> str:
        """The machine type to start for *machine* (an alias or a type)."""
        return self.pinned.get(machine, machine)

    def describe(self) -> str:
        if not self.pinned:
            return self.why
        pins = ", ".join(f"{alias} -> {name}" for alias, name in sorted(self.pinned.items()))
        return f"{pins} ({self.why})"


def parse_override(text: str) -> dict[str, str]:
    """``pc-q35-9.2`` or ``q35=pc-q35-9.2``, comma-separated -> {alias: type}."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        alias, _, name = item.rpartition("=")
        if not alias:
            alias = next((a for a, prefix in FAMILIES.items() if name.startswith(prefix)), "")
        if alias not in FAMILIES or not name.startswith(FAMILIES[alias]):
            raise MachineTypeError(
                f"--fastsnap-machine: {item!r} is not a versioned type of "
                f"{' or '.join(FAMILIES)} (e.g. pc-q35-10.0, pc-i440fx-10.0)")
        out[alias] = name
    return out


def choose_machine_types(src: QemuProbe, dst: QemuProbe, override: str | None
                         ) -> MachineTypes:
    """The machine types of a run with binaries *src* and *dst*."""
    pinned = parse_override(override) if override else {}
    for name in pinned.values():
        lacking = [p for p in (src, dst) if name not in p.machines]
        if lacking:
            raise MachineTypeError(
                f"--fastsnap-machine: {name} is not a machine type of "
                f"{', '.join(f'{p.binary} ({p.version_str})' for p in lacking)}")
    if src.binary == dst.binary:
        return MachineTypes(pinned, "--fastsnap-machine") if pinned else MachineTypes()
    older = min((src, dst), key=lambda p: p.version)
    other = dst if older is src else src
    for alias in FAMILIES:
        if alias in pinned:
            continue
        name = older.resolve_machine(alias)
        if name == alias or name not in other.machines:
            raise MachineTypeError(
                f"no machine type for {alias!r} that both binaries have: {older.binary} "
                f"({older.version_str}) resolves it to {name}, which {other.binary} "
                f"({other.version_str}) lacks; pass --fastsnap-machine=TYPE")
        pinned[alias] = name
    why = (f"the older QEMU's ({older.version_str}) resolution of the aliases, "
           "so both binaries have them")
    if override:
        why = f"--fastsnap-machine; others: {why}"
    return MachineTypes(pinned, why)
