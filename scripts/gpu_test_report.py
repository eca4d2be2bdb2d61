"""The GPU test run's JUnit report as a result file: device, date, commit, and each test's
outcome, time and recorded figures (`record_property`).

    python scripts/gpu_test_report.py gpu_tests.xml gpu_tests_h200.json [--device NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from typing import Any


def outcome(case: ET.Element) -> str:
    for kind in ("failure", "error", "skipped"):
        if case.find(kind) is not None:
            return kind
    return "passed"


def report(xml_path: str, device: str, commit: str) -> dict[str, Any]:
    suite = ET.parse(xml_path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    assert suite is not None, f"{xml_path}: no test suite"
    tests = []
    for case in suite.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome(case), "seconds": float(case.get("time", 0)),
                      **({"figures": props} if props else {})})  # fmt: skip
    counts = {
        k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")
    }
    return {"benchmark": "gpu_tests", "device": device, "date": suite.get("timestamp"),
            "commit": commit, "counts": counts, "tests": tests}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("xml")
    parser.add_argument("out")
    parser.add_argument("--device", help="default: torch's name for CUDA device 0")
    parser.add_argument("--commit", default=os.environ.get("PRISM_COMMIT", "unknown"))
    args = parser.parse_args()
    device = args.device
    if device is None:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    data = report(args.xml, device, args.commit)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"{args.out}: {data['counts']}")


if __name__ == "__main__":
    main()
