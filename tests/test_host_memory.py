"""The host peak-memory figures (driver metrics, the conversion memory test) measure the process itself:
a child of a large process must not report the parent's size as its own peak."""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, resource
from maskllm_megatron.train.metrics import host_peak_rss_bytes, host_rss_bytes, reset_host_peak_rss
start_peak = host_peak_rss_bytes()
inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
block = bytearray(300 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
after_alloc = host_peak_rss_bytes()
del block
reset = reset_host_peak_rss()
print(json.dumps({"start_peak": start_peak, "inherited": inherited, "after_alloc": after_alloc, "reset": reset,
                  "after_reset": host_peak_rss_bytes(), "rss": host_rss_bytes()}))
"""


def test_a_child_of_a_large_process_reads_its_own_peak():
    parent = bytearray(1200 * 2**20)  # what pytest holds after building the SmolLM2 folder on a fresh machine
    for i in range(0, len(parent), 4096):
        parent[i] = 1
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    mib = {k: v / 2**20 for k, v in m.items() if k != "reset"}
    print(mib)
    assert m["inherited"] > 1100 * 2**20  # the kernel's ru_maxrss carries the parent's size into the child
    assert m["start_peak"] < 700 * 2**20, mib  # ours does not
    assert m["after_alloc"] >= m["start_peak"] + 290 * 2**20, mib
    assert m["reset"]
    assert m["after_reset"] < m["after_alloc"] - 250 * 2**20, mib  # the high-water mark went back to now
    assert abs(m["after_reset"] - m["rss"]) < 16 * 2**20, mib
    del parent
