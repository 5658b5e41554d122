"""Dependency audit of the pinned set (constraints.txt, plus docker/constraints-gpu.txt with --gpu).

    python tools/audit.py [--pip-audit PATH] [--gpu] [--json OUT]

1. pip-audit (when given) checks every pin against PyPI's advisory data, which it reads from PyPI's
   per-release JSON API (``/pypi/NAME/VERSION/json``).
2. Pins it could not check ("not found on PyPI": the per-release API is blocked on some networks, this project's
   CI machines among them) are checked against the project JSON (``/pypi/NAME/json``), whose ``vulnerabilities``
   describe the latest release: exact when the pin is the latest release, otherwise the pin is reported as not
   audited, with the latest version beside it.

Prints one line per pin and a summary; exits 1 when any known vulnerability affects a pin, 0 otherwise (the
summary says how many pins could not be audited, so a clean exit never hides that).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pins(files: list[Path]) -> dict[str, str]:
    out = {}
    for f in files:
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def run_pip_audit(tool: str, files: list[Path]) -> dict[str, dict]:
    """pip-audit's verdict per pin: {"vulns": [...]} or {"skip": reason}."""
    cmd = [tool, "--no-deps", "--disable-pip", "--progress-spinner", "off", "--format", "json"]
    for f in files:
        cmd += ["-r", str(f)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if not done.stdout.strip():
        raise SystemExit(f"pip-audit produced no report (exit {done.returncode}): {done.stderr[-1500:]}")
    report = json.loads(done.stdout)
    out = {}
    for dep in report.get("dependencies", []):
        name = dep["name"].lower().replace("_", "-")
        out[name] = {"skip": dep["skip_reason"]} if dep.get("skip_reason") else {"vulns": dep.get("vulns", [])}
    return out


def pypi_latest(name: str) -> tuple[str, list[dict]]:
    """(latest version, vulnerabilities of the latest version) from PyPI's project JSON."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as r:
        data = json.load(r)
    return data["info"]["version"], data.get("vulnerabilities") or []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pip-audit", help="path of a pip-audit executable (step 1); without it only step 2 runs")
    parser.add_argument("--gpu", action="store_true", help="also audit docker/constraints-gpu.txt")
    parser.add_argument("--json", type=Path, help="write the per-pin results here")
    args = parser.parse_args(argv)
    files = [REPO / "constraints.txt"] + ([REPO / "docker" / "constraints-gpu.txt"] if args.gpu else [])
    pinned = pins(files)
    verdicts = run_pip_audit(args.pip_audit, files) if args.pip_audit else {}
    results, vulnerable, unaudited = {}, 0, 0
    for name, version in sorted(pinned.items()):
        verdict = verdicts.get(name, {"skip": "pip-audit not run"})
        if "vulns" in verdict:
            found = [v["id"] for v in verdict["vulns"]]
            status = f"pip-audit: {', '.join(found) or 'no known vulnerabilities'}"
        else:
            try:
                latest, vulns = pypi_latest(name)
            except OSError as exc:
                latest, vulns = None, []
                status = f"NOT AUDITED ({verdict['skip']}; project JSON unreachable: {exc})"
            if latest == version:
                found = [v["id"] for v in vulns if not v.get("withdrawn")]
                status = f"latest release; PyPI advisories: {', '.join(found) or 'none'}"
            elif latest is not None:
                found = []
                status = f"NOT AUDITED (pinned {version}, latest {latest}; {verdict['skip']})"
        if status.startswith("NOT AUDITED"):
            unaudited += 1
        vulnerable += bool(found)
        results[name] = {"version": version, "vulnerabilities": found, "status": status}
        print(f"{name:<28} {version:<16} {status}")
    audited = len(pinned) - unaudited
    print(f"\n{len(pinned)} pins: {audited} audited, {vulnerable} with known vulnerabilities, {unaudited} not audited")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
