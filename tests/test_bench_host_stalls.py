"""benchmarks/host_stalls.c, the probe behind the README's account of the
4 GiB tail: it builds warning-free as C11, prints one line per round and
size with ordered percentiles and a summary per size, and refuses bad
options naming them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pytest_fastsnap.native.loader import compiler

SOURCE = Path(__file__).resolve().parent.parent / "benchmarks" / "host_stalls.c"
ROUND = re.compile(r"^round (\d+), (\d+) MiB: p50 ([\d.]+) p99 ([\d.]+) p99\.9 ([\d.]+) "
                   r"max (\d+) us; ([\d.]+)% of reads over 20 us$", re.MULTILINE)


SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]


@pytest.fixture(scope="module", params=["release", "asan"])
def host_stalls(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Path:
    """The probe built as the README says, and with ASan + UBSan."""
    exe = tmp_path_factory.mktemp("host_stalls") / "host_stalls"
    extra = SANITIZE if request.param == "asan" else []
    subprocess.run([compiler(), "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", *extra,
                    "-o", str(exe), str(SOURCE)], check=True, capture_output=True, text=True)
    return exe


def test_rounds_are_interleaved_and_percentiles_ordered(host_stalls: Path) -> None:
    res = subprocess.run([str(host_stalls), "--sizes", "1M,8M", "--reads", "20000",
                          "--rounds", "3"], capture_output=True, text=True, timeout=120,
                         check=True)
    rows = ROUND.findall(res.stdout)
    # round by round, every size in each round, in the order given
    assert [(int(r), int(mib)) for r, mib, *_ in rows] == \
        [(r, mib) for r in (1, 2, 3) for mib in (1, 8)], res.stdout
    for _, _, p50, p99, p999, mx, share in rows:
        assert 0 < float(p50) <= float(p99) <= float(p999) <= float(mx) + 1, res.stdout
        assert 0 <= float(share) <= 100
    assert "1 MiB: first touch " in res.stdout and "8 MiB: first touch " in res.stdout
    assert re.search(r"^1 MiB: median p99 [\d.]+ us, [\d.]+% of reads over 20 us$",
                     res.stdout, re.MULTILINE), res.stdout
    assert re.search(r"^8 MiB: median p99 ", res.stdout, re.MULTILINE), res.stdout


@pytest.mark.parametrize(("args", "why"), [
    ([], "--sizes is required"),
    (["--sizes", "1X"], "bad --sizes"),
    (["--sizes", "4K"], "bad --sizes"),
    (["--sizes", "1G", "--reads", "5"], "--reads wants 100..100000000"),
    (["--sizes", "1G", "--reads", "1000x"], "--reads wants 100..100000000"),
    (["--sizes", "1G", "--rounds", "2.5"], "--rounds wants 1..1000"),
    (["--sizes", "1G", "--rounds", "0"], "--rounds wants 1..1000"),
    (["--sizes", "1G", "--threshold-us", "-1"], "--threshold-us wants a positive"),
    (["--sizes", "1G", "--threshold-us", "20us"], "--threshold-us wants a positive"),
    (["--sizes", "1G", "--bogus", "1"], "unknown option"),
    (["--sizes"], "every option takes a value"),
])
def test_bad_options_are_refused_naming_them(host_stalls: Path, args: list[str],
                                             why: str) -> None:
    res = subprocess.run([str(host_stalls), *args], capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 2 and why in res.stderr and "usage: host_stalls" in res.stderr, \
        res.stderr
    assert res.stdout == ""
