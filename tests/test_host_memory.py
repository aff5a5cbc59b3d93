"""train/host_memory.py: the pages malloc keeps after a phase frees them go back to the OS.

The oracle is the kernel's own count (VmRSS), in a fresh process: the heap is fragmented the way a
ZeRO-3 build fragments it (a full-size block per parameter freed between the partitions kept), then
released; the kept blocks must be intact."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from compt_scale.train.host_memory import release_freed_host_memory

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    MB = 2**20
    big = bytearray(24 * MB)            # one freed mmapped block: glibc's mmap threshold rises past 4 MB
    del big
    kept, freed = [], []
    for i in range(64):                 # a "parameter": its partition kept, a full-size block beside it
        kept.append(bytearray([i % 251]) * (2 * MB))
        freed.append(bytearray(b"x") * (4 * MB))
    del freed                           # freed between live blocks: holes malloc keeps
    before = rss()
    released = release_freed_host_memory()
    after = rss()
    intact = all(k.count(k[0]) == len(k) and k[0] == i % 251 for i, k in enumerate(kept))
    print(json.dumps({"before": before, "after": after, "released": released, "intact": intact}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_pages_go_back_to_the_os(tmp_path):
    import json
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["intact"], res
    # 64 freed 4 MB blocks sat between live ones (256 MB); most of it is returned.
    assert res["before"] - res["after"] >= 200 * 2**20, res
    assert res["released"] is True, res
