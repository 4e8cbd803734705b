"""Run the medxfer CLI with its address space capped (RLIMIT_AS), the cap set only after the imports.

    python tests/capped_ingest.py HEADROOM_BYTES RESULT.json ingest SOURCE --out DIR ...

The cap is the address space in use once pipeline.cli and the ingest modules are imported, plus
HEADROOM_BYTES. RESULT.json gets the exit code, the cap, the peak address space (VmPeak) and the
peak resident set size (VmHWM; ru_maxrss too) of this process. Used by tests/test_hostile_ingest.py.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import pipeline.cli
import pipeline.ingest.dicom_pixels
import pipeline.ingest.manifest


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> int:
    headroom, result, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    cap = _status_kb("VmSize") * 1024 + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        rc = pipeline.cli.main(argv)
    except MemoryError:
        rc = 137
    usage = resource.getrusage(resource.RUSAGE_SELF)
    facts = {
        "rc": rc,
        "cap_bytes": cap,
        "vmpeak_kb": _status_kb("VmPeak"),  # peak address space
        "vmhwm_kb": _status_kb("VmHWM"),  # peak RSS of this program (reset at exec)
        "maxrss_kb": usage.ru_maxrss,  # peak RSS, but Linux keeps the parent's from before exec
    }
    result.write_text(json.dumps(facts))
    return rc


if __name__ == "__main__":
    sys.exit(main())
