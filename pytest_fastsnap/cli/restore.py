"""`fastsnap restore SNAPSHOT`: run a guest from a snapshot, RAM loaded lazily."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pytest_fastsnap.cli.common import (
    CliError,
    UsageError,
    cli_error,
    existing_file,
    int_arg,
    one_line,
    output_file,
    seconds_arg,
    temp_workdir,
    validate_qemu_binary,
)

if TYPE_CHECKING:
    from pytest_fastsnap.restore.manifest import Manifest


def restore_cli(snapshot: Path, qemu_binary: str | None = None, *,
                strategy: str = "loader-bridge", keep_running: bool = False,
                recover_attempts: int | None = None, out: TextIO = sys.stdout,
                ws: Path | None = None, record_ws: Path | None = None,
                ws_mode: str = "after-run", to: str = "unix", preempt: bool = False,
                eager_delay: float | None = None, pin: str | None = None) -> int:
    """Restore *snapshot* on the system QEMU with the arguments recorded in
    ``<snapshot>.json``; print time to running and time to fully loaded.

    Returns 0 on success, 2 for bad input (a missing or invalid snapshot or
    manifest, an unusable QEMU binary, an unsupported strategy), 1 for a
    failed restore; errors are one line on stderr.  With *keep_running* the
    guest stays up until Ctrl-C (or until it exits).  *recover_attempts*
    (loader-bridge only; default 3, 0 = off; with *preempt* too) bounds how
    often a lost loader is recovered; each recovery is printed.  *ws* /
    *record_ws* / *ws_mode*: working-set prefetch of the loader bridge (see
    :func:`pytest_fastsnap.restore.strategies.restore`).  *to* (bridge):
    ``unix`` or ``tcp:HOST:PORT`` (the destination listens there, the loader
    connects; port 0: any free port); *preempt*: the postcopy-preempt channel.
    *eager_delay* (bridge): for that many seconds after the guest starts the
    loader serves only page requests (what a ``record_ws`` run then records
    is what the guest touched, not what the eager stream happened to send
    first), then streams the rest.  *pin* (bridge): ``auto`` or
    ``REQUESTS/EAGER`` CPU lists, the request path and vCPUs apart from the
    eager stream (:mod:`pytest_fastsnap.restore.pinning`).
    """
    try:
        if recover_attempts is not None and strategy != "loader-bridge":
            raise UsageError(f"--recover-attempts applies to --strategy loader-bridge only, "
                             f"not {strategy}")
        if eager_delay is not None and strategy != "loader-bridge":
            raise UsageError(f"--eager-delay applies to --strategy loader-bridge only, "
                             f"not {strategy}")
        if (ws or record_ws) and strategy != "loader-bridge":
            raise UsageError(f"--ws and --record-ws need --strategy loader-bridge, "
                             f"not {strategy}")
        _check_transport(strategy, to, preempt)
        if record_ws and preempt:
            raise UsageError("--record-ws with --preempt is not supported: requests answered "
                             "on the preempt channel are not recorded")
        if ws is not None:
            ws = existing_file(ws, "--ws working-set file")
        if record_ws is not None:
            record_ws = output_file(record_ws, "--record-ws")
        bridge_kw: dict[str, Any] = {"ws": ws, "record_ws": record_ws, "ws_mode": ws_mode}
        if strategy == "loader-bridge":
            bridge_kw.update(transport=to, preempt=preempt)
        if pin is not None:
            if strategy != "loader-bridge":
                raise UsageError(f"--pin applies to --strategy loader-bridge only, not {strategy}")
            from pytest_fastsnap.restore.pinning import parse_pin
            try:
                bridge_kw["pin"] = parse_pin(pin)
            except ValueError as err:
                raise UsageError(f"--{err}") from None
        if eager_delay is not None:
            bridge_kw["loader_args"] = ("--eager-delay", f"{eager_delay:.6f}")
        return _restore(snapshot, qemu_binary, strategy, keep_running, out, bridge_kw,
                        recover_attempts)
    except CliError as err:
        cli_error("restore", err)
        return err.exit_code


def _check_transport(strategy: str, to: str, preempt: bool) -> None:
    """UsageError for a --to / --preempt that cannot work, before anything starts."""
    from pytest_fastsnap.restore.transport import parse_transport

    if to != "unix" and not to.startswith("tcp:"):
        raise UsageError(f"--to {to!r}: unix or tcp:HOST:PORT")
    try:
        parse_transport(to)
    except ValueError as err:
        raise UsageError(f"--to {err}") from None
    if strategy != "loader-bridge" and (preempt or to != "unix"):
        raise UsageError(f"--to and --preempt are for --strategy loader-bridge, not {strategy}")


def _checked_inputs(snapshot: Path, qemu_binary: str | None) -> tuple[Manifest, str]:
    """The manifest and the QEMU binary, once the snapshot, its manifest and
    the binary all check out; UsageError naming the first that does not."""
    from pytest_fastsnap.restore.libvirt_image import libvirt_manifest
    from pytest_fastsnap.restore.manifest import read_manifest
    from pytest_fastsnap.snapshot.errors import FormatError
    from pytest_fastsnap.snapshot.format import parse

    snapshot = existing_file(snapshot, "snapshot")
    try:  # a libvirt save image carries its domain XML: no <snapshot>.json needed
        manifest = libvirt_manifest(snapshot) or read_manifest(snapshot)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        parse(snapshot, manifest.offset)
    except FormatError as err:
        raise UsageError(f"snapshot {snapshot}: not a mapped-ram snapshot at offset "
                         f"{manifest.offset:#x}: {err}") from None
    return manifest, validate_qemu_binary(qemu_binary or manifest.binary)


def _restore(snapshot: Path, qemu_binary: str | None, strategy: str, keep_running: bool,
             out: TextIO, bridge_kw: dict[str, Any],
             recover_attempts: int | None = None) -> int:
    from pytest_fastsnap.qemu.machine import QemuError
    from pytest_fastsnap.restore.recovery import DEFAULT_RECOVER_ATTEMPTS
    from pytest_fastsnap.restore.strategies import (
        RestoreFailed,
        RestoreRefused,
        RestoreUnsupported,
        machine_factory,
        restore,
    )

    manifest, binary = _checked_inputs(snapshot, qemu_binary)
    with temp_workdir("fastsnap-restore-") as workdir:
        guest = None
        try:
            attempts = DEFAULT_RECOVER_ATTEMPTS if recover_attempts is None else recover_attempts
            guest = restore(strategy, snapshot, manifest.qemu_args,
                            machine_factory(binary, workdir), offset=manifest.offset,
                            **bridge_kw, **({"recover_attempts": attempts}
                                            if strategy == "loader-bridge" else {}))
            print(f"{strategy}: guest running after {guest.time_to_running:.3f} s "
                  f"(QEMU start-up {guest.launch_seconds:.3f} s before that)", file=out,
                  flush=True)
            loaded = guest.wait_loaded()
            print(f"{strategy}: fully loaded after {loaded:.3f} s", file=out, flush=True)
            for a in guest.recovery.attempts if guest.recovery is not None else ():
                ack = a.resume_ack_at
                print(f"recovery {a.number}: {a.kind} after {a.cause}"
                      + (f"; RESUME_ACK {ack - a.t_lost:.3f} s after the loss was seen"
                         if ack else ""), file=out, flush=True)
            stats = guest.loader_stats
            if stats:
                lat = stats.get("latency_us", {})
                print(f"loader: {stats.get('requests_served', 0)} page requests served "
                      f"(p50 {lat.get('p50', 0):.0f} us, p99 {lat.get('p99', 0):.0f} us), "
                      f"{stats.get('pages_eager', 0)} pages eagerly at "
                      f"{stats.get('eager_throughput_mib_s', 0):.0f} MiB/s over "
                      f"{stats.get('transport', 'unix')}"
                      + (f", {stats['preempt']['pages_on_request']} pages on the preempt "
                         "channel" if stats.get("preempt") else ""), file=out, flush=True)
                if stats.get("ws_loaded"):
                    print(f"loader: working set of {stats['ws_loaded']} pages sent "
                          f"{stats.get('ws_mode')}, {stats.get('pages_ws', 0)} of them not "
                          "yet sent otherwise", file=out, flush=True)
                if stats.get("eager_hold_end_s"):
                    print(f"loader: only page requests served until "
                          f"{stats['eager_hold_end_s']:.3f} s (--eager-delay)", file=out,
                          flush=True)
                if record_ws_path := bridge_kw.get("record_ws"):
                    print(f"loader: recorded a working set of {stats.get('ws_recorded', 0)} "
                          f"pages to {record_ws_path}", file=out, flush=True)
            if guest.pinner is not None:
                pin = guest.pinner.report()
                print(f"pin {pin['spec']}: {len(pin['threads'])} threads pinned"
                      + (f"; not found: {', '.join(pin['missing'])}" if pin["missing"] else "")
                      + (f"; failed: {'; '.join(pin['errors'])}" if pin["errors"] else ""),
                      file=out, flush=True)
            if keep_running:
                print(f"guest running (QEMU pid {guest.vm.pid}, log {guest.vm.log_path}); "
                      "Ctrl-C stops it", file=out, flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while guest.vm.is_running():
                        time.sleep(0.5)
            return 0
        except (RestoreUnsupported, RestoreRefused) as err:  # unusable binary / invalid file
            raise UsageError(one_line(err)) from None
        except (RestoreFailed, QemuError, OSError) as err:
            raise CliError(one_line(err)) from None
        finally:
            if guest is not None:
                guest.close()


def run(args: argparse.Namespace) -> int:
    return restore_cli(Path(args.snapshot), qemu_binary=args.qemu_binary,
                       strategy=args.strategy, keep_running=args.keep_running,
                       recover_attempts=args.recover_attempts,
                       ws=args.ws, record_ws=args.record_ws, ws_mode=args.ws_mode,
                       to=args.to, preempt=args.preempt, eager_delay=args.eager_delay,
                       pin=args.pin)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("restore", help="run a guest from a snapshot, RAM loaded lazily",
                       description="Start a QEMU with the arguments recorded in "
                       "<snapshot>.json and restore SNAPSHOT into it; print time to running "
                       "and time to fully loaded, then stop the guest (--keep-running "
                       "leaves it up).")
    p.add_argument("snapshot", help="a snapshot written by `fastsnap save` or "
                   "snapshot_factory (<snapshot>.json next to it)")
    p.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY"),
                   help="default: $QEMU_BINARY, else the binary recorded in <snapshot>.json")
    p.add_argument("--strategy", default="loader-bridge",
                   choices=("loader-bridge", "qemu-precopy", "qemu-fast"))
    p.add_argument("--to", default="unix", metavar="unix|tcp:HOST:PORT",
                   help="loader-bridge transport: unix socket (default), or the destination "
                   "listens on tcp:HOST:PORT and the loader connects (port 0: any free port)")
    p.add_argument("--preempt", action="store_true",
                   help="loader-bridge: postcopy-preempt on, requested pages on a second "
                   "connection")
    p.add_argument("--pin", default=None, metavar="auto|REQUESTS/EAGER",
                   help="loader-bridge: run the vCPUs and the page-request path (QEMU's fault "
                   "and preempt threads, the loader's request thread) on the REQUESTS CPUs and "
                   "the eager stream (the loader's sender, QEMU's listen thread) on the EAGER "
                   "CPUs, e.g. 0/1 or 0-2/3; auto: the last CPU for the eager stream")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the guest running until Ctrl-C")
    p.add_argument("--recover-attempts", type=int_arg(minimum=0, maximum=100), default=None,
                   metavar="N", help="loader-bridge: recover a loader that dies or loses its "
                   "connection up to N times (QEMU postcopy recovery; default 3, 0 = off)")
    p.add_argument("--record-ws", type=Path, default=None, metavar="FILE",
                   help="loader-bridge: write the pages the guest requested, in order, to "
                   "FILE once the restore completes")
    p.add_argument("--ws", type=Path, default=None, metavar="FILE",
                   help="loader-bridge: send the pages of a --record-ws FILE of this "
                   "snapshot first")
    p.add_argument("--ws-mode", default="after-run", choices=("before-run", "after-run"),
                   help="when --ws pages go: before the guest runs, or at the head of the "
                   "eager stream (default after-run)")
    p.add_argument("--eager-delay", type=seconds_arg(), default=None, metavar="S",
                   help="loader-bridge: serve only the guest's page requests for S seconds "
                   "after it starts, then stream the rest (so --record-ws records what the "
                   "guest touched)")
    p.set_defaults(func=run)
