"""Time to running: `virsh restore` vs `fastsnap restore` (loader bridge) of the same
libvirt sparse save image.

    python benchmarks/bench_libvirt_restore.py --mem-mib 1024 --repeat 3

A private libvirtd (pytest_fastsnap/libvirtd.py, needs root and libvirt >= 11.2)
boots a TCG q35 domain whose tiny guest fills all but 64 MiB of its RAM with its
pattern (a quarter of the pages zero), saves it running with `virsh save
--image-format sparse`, then restores it --repeat times each way, interleaved.
Both clocks run from the call until the guest runs: `virsh restore` returns
once the domain runs (was_running 1); ours is QEMU start-up + `migrate-incoming`
to the RESUME event.  The one-off `domxml-to-native` call (libvirt's embedded
driver; QEMU capabilities are cached after the first) is timed separately.
Prints JSON; every restored guest answers a ping before it is stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pytest_fastsnap.guests.tiny import TinyGuest, TinyParams, tiny_kernel
from pytest_fastsnap.libvirtd import LibvirtDomain, PrivateLibvirt, libvirt_version
from pytest_fastsnap.restore.libvirt_image import libvirt_manifest
from pytest_fastsnap.restore.strategies import machine_factory, restore


def bench(mem_mib: int, repeat: int, workdir: Path) -> dict:
    params = TinyParams(size=(mem_mib - 64) << 20)
    out: dict = {"libvirt": libvirt_version(), "mem_mib": mem_mib, "pattern_mib":
                 params.size >> 20, "virsh_restore_s": [], "bridge_wall_s": [],
                 "bridge_launch_s": [], "bridge_running_s": [], "bridge_loaded_s": []}
    with PrivateLibvirt(Path(tempfile.mkdtemp(prefix="lv-", dir=workdir))).start() as lv:
        domain = LibvirtDomain.tiny(lv, "bench", workdir, tiny_kernel(), params.cmdline(),
                                    mem_mib=mem_mib).create()
        try:
            TinyGuest(domain, params).wait_ready(timeout=1800)  # type: ignore[arg-type]
            image = workdir / "bench.img"
            t0 = time.monotonic()
            res = domain.save(image, "--image-format", "sparse")
            out["virsh_save_s"] = time.monotonic() - t0
            if res.returncode:
                raise RuntimeError(res.stderr)
            out["image_bytes"] = image.stat().st_size
            out["image_allocated_bytes"] = image.stat().st_blocks * 512
            t0 = time.monotonic()
            manifest = libvirt_manifest(image)
            out["domxml_to_native_s"] = time.monotonic() - t0
            assert manifest is not None
            for _ in range(repeat):
                t0 = time.monotonic()
                domain.restore(image)
                out["virsh_restore_s"].append(time.monotonic() - t0)
                TinyGuest(domain, params).ping()  # type: ignore[arg-type]
                lv.virsh("destroy", domain.name)
                t0 = time.monotonic()
                guest = restore("loader-bridge", image, manifest.qemu_args,
                                machine_factory(manifest.binary, workdir),
                                offset=manifest.offset)
                with guest:
                    out["bridge_wall_s"].append(time.monotonic() - t0)
                    out["bridge_launch_s"].append(guest.launch_seconds)
                    out["bridge_running_s"].append(guest.time_to_running)
                    TinyGuest(guest.vm, params).ping()
                    out["bridge_loaded_s"].append(guest.wait_loaded())
        finally:
            domain.close()
    for key in [k for k, v in out.items() if isinstance(v, list)]:
        out[key.replace("_s", "_median_s")] = statistics.median(out[key])
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastsnap-lvbench-") as tmp:
        print(json.dumps(bench(args.mem_mib, args.repeat, Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
