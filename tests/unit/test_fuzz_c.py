"""A bounded libFuzzer run of each harness in fuzz/ (the C in cffi_build/ under ASan and UBSan,
guest memory rewritten by a racer thread during each call; see doc/fuzzing.md).

Each test builds its harness with clang into a temporary directory (a few seconds), then
fuzzes for VHOSTPASST_FUZZ_SECONDS (default 15) from the committed seed corpus
(fuzz/corpus/<name>/, read-only here: new inputs go to the temporary directory). Any crash,
sanitizer report, broken harness invariant, timeout or memory blow-up makes libFuzzer exit
non-zero, and the test fails with the report. The tests skip only when clang or its libFuzzer
runtime is missing (scripts/setup-debian.sh installs both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
SECONDS = int(os.environ.get("VHOSTPASST_FUZZ_SECONDS", "15"))


def _clang() -> str | None:
    for name in ("clang", "clang-14", "clang-15", "clang-16"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def clang(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = _clang()
    if cc is None:
        pytest.skip("needs clang (scripts/setup-debian.sh installs it)")
    probe = tmp_path_factory.mktemp("probe")
    src = probe / "p.c"
    src.write_text("#include <stddef.h>\n#include <stdint.h>\n"
                   "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)"
                   " { (void)d; (void)n; return 0; }\n")
    r = subprocess.run([cc, "-fsanitize=fuzzer,address,undefined", "-o", str(probe / "p"),
                        str(src)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"clang has no libFuzzer/sanitizer runtime: {r.stderr.strip()[-300:]}")
    return cc


@pytest.mark.timeout(SECONDS + 240)
@pytest.mark.parametrize("name", ["ring", "frames", "dataplane", "fill"])
def test_fuzz_harness(name: str, clang: str, tmp_path: Path) -> None:
    build = subprocess.run(
        ["make", "-s", "-C", str(FUZZ), f"CC={clang}", f"OUT={tmp_path}",
         f"{tmp_path}/{name}_fuzz"], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout + build.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = FUZZ / "corpus" / name
    args = [str(tmp_path / f"{name}_fuzz"), f"-max_total_time={SECONDS}", "-timeout=10",
            "-rss_limit_mb=1024", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
            str(corpus)]
    if seeds.is_dir():
        args.append(str(seeds))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    run = subprocess.run(args, capture_output=True, text=True, env=env,
                         timeout=SECONDS + 120)
    report = run.stderr[-6000:]
    crashes = sorted(p.name for p in tmp_path.iterdir()
                     if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert run.returncode == 0 and not crashes, f"{name}_fuzz found {crashes}:\n{report}"
    assert "stat::number_of_executed_units" in run.stderr, report
