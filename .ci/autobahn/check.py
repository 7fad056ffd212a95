#!/usr/bin/env python3
"""Check an Autobahn|Testsuite fuzzingclient report (python3, stdlib only).

Usage: check.py OUTDIR --deflate required|unimplemented
                [--agent duplex] [--expect-cases N]

Reads OUTDIR/reports/index.json (OUTDIR may also be the reports folder),
prints a per-section summary and every failing case, and ends with the line
`autobahn: N passed, M failed`. Exit status 1 if M > 0.

Rules:
  * sections 12 and 13 (permessage-deflate): with --deflate unimplemented the
    behavior must be UNIMPLEMENTED; with --deflate required, OK or
    INFORMATIONAL;
  * every other section (1-10, and any the suite may add): OK or
    INFORMATIONAL (NON-STRICT is a failure);
  * behaviorClose must be OK. The suite reports behaviorClose OK for a case
    whose extension was not negotiated (UNIMPLEMENTED) when the closing
    handshake was clean, so nothing else is accepted there. The only
    exception is the suite's own "undefined by the spec" cases (7.1.6,
    7.13.1, 7.13.2), which always report behavior and behaviorClose
    INFORMATIONAL: behaviorClose INFORMATIONAL is accepted only together with
    behavior INFORMATIONAL;
  * with --expect-cases N, every missing case counts as failed (e.g. when the
    server went away mid-run and wstest skipped the rest).
"""

import argparse
import html
import json
import os
import re
import sys

DEFLATE_SECTIONS = {12, 13}
PASSING = ("OK", "INFORMATIONAL")
KNOWN_BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
DETAILED_FAILURES = 60  # print description/result for this many failures
TEXT_LIMIT = 400


def case_key(case_id):
    parts = []
    for p in case_id.split("."):
        try:
            parts.append((0, int(p), ""))
        except ValueError:
            parts.append((1, 0, p))
    return parts


def section_of(case_id):
    try:
        return int(case_id.split(".")[0])
    except ValueError:
        return None


def judge(case_id, behavior, behavior_close, deflate):
    """Return a list of reasons why the case fails (empty if it passes)."""
    reasons = []
    section = section_of(case_id)
    if section in DEFLATE_SECTIONS and deflate == "unimplemented":
        if behavior != "UNIMPLEMENTED":
            reasons.append("permessage-deflate must not be negotiated "
                           "(--deflate unimplemented), so behavior must be "
                           "UNIMPLEMENTED")
    elif behavior not in PASSING:
        if behavior == "UNIMPLEMENTED":
            reasons.append("permessage-deflate was not negotiated, but "
                           "--deflate required needs OK or INFORMATIONAL")
        else:
            reasons.append("behavior must be OK or INFORMATIONAL")
    if behavior_close != "OK" and not (
            behavior_close == "INFORMATIONAL" and behavior == "INFORMATIONAL"):
        reasons.append("behaviorClose must be OK")
    return reasons


def one_line(text, limit=TEXT_LIMIT):
    """Flatten the suite's HTML-ish text (<b>, <br>) to one plain line."""
    text = html.unescape(re.sub(r"<[^>]*>", " ", str(text)))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def load_case_report(reports_dir, entry):
    name = entry.get("reportfile")
    if not name:
        return {}
    try:
        with open(os.path.join(reports_dir, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def finish(passed, failed):
    print("autobahn: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", help="run.sh --out folder, or its reports/ folder")
    ap.add_argument("--deflate", required=True,
                    choices=["required", "unimplemented"])
    ap.add_argument("--agent", default=None,
                    help="agent name in index.json (default: the only one)")
    ap.add_argument("--expect-cases", type=int, default=None,
                    help="number of cases the run was meant to execute")
    args = ap.parse_args(argv)

    reports_dir = os.path.join(args.outdir, "reports")
    if not os.path.isfile(os.path.join(reports_dir, "index.json")):
        reports_dir = args.outdir
    index_path = os.path.join(reports_dir, "index.json")
    missing_all = args.expect_cases or 1

    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        print("autobahn: cannot read %s: %s" % (index_path, e))
        return finish(0, missing_all)

    if args.agent is None:
        if len(index) != 1:
            print("autobahn: %s has agents %s; pass --agent"
                  % (index_path, sorted(index)))
            return finish(0, missing_all)
        agent = next(iter(index))
    else:
        agent = args.agent
    cases = index.get(agent)
    if not cases:
        print("autobahn: no results for agent %r in %s (agents: %s); did "
              "wstest reach the server?" % (agent, index_path, sorted(index)))
        return finish(0, missing_all)

    # Per-section counts.
    ids = sorted(cases, key=case_key)
    behaviors = list(KNOWN_BEHAVIORS)
    for cid in ids:
        b = cases[cid].get("behavior", "?")
        if b not in behaviors:
            behaviors.append(b)
    table = {}
    failures = []
    for cid in ids:
        entry = cases[cid]
        b = entry.get("behavior", "?")
        bc = entry.get("behaviorClose", "?")
        row = table.setdefault(section_of(cid), {"cases": 0, "close": 0})
        row["cases"] += 1
        row[b] = row.get(b, 0) + 1
        if bc != "OK":
            row["close"] += 1
        reasons = judge(cid, b, bc, args.deflate)
        if reasons:
            failures.append((cid, b, bc, reasons))

    print("Autobahn|Testsuite results for agent %r (%d cases, --deflate %s)"
          % (agent, len(ids), args.deflate))
    header = ["section", "cases"] + behaviors + ["close!=OK"]
    widths = [max(len(h), 7) for h in header]
    fmt = "  ".join("%%%ds" % w for w in widths)
    print(fmt % tuple(header))
    totals = {"cases": 0, "close": 0}
    for section in sorted(table, key=lambda s: (s is None, s or 0)):
        row = table[section]
        print(fmt % tuple([section if section is not None else "?", row["cases"]]
                          + [row.get(b, 0) for b in behaviors] + [row["close"]]))
        for k, v in row.items():
            totals[k] = totals.get(k, 0) + v
    print(fmt % tuple(["all", totals["cases"]]
                      + [totals.get(b, 0) for b in behaviors] + [totals["close"]]))

    failed = len(failures)
    passed = len(ids) - failed
    missing = 0
    if args.expect_cases is not None and len(ids) < args.expect_cases:
        missing = args.expect_cases - len(ids)

    if failures:
        print()
        print("Failing cases (%d):" % failed)
        for n, (cid, b, bc, reasons) in enumerate(failures):
            print("FAIL %s: behavior=%s behaviorClose=%s -- %s"
                  % (cid, b, bc, "; ".join(reasons)))
            if n >= DETAILED_FAILURES:
                continue
            detail = load_case_report(reports_dir, cases[cid])
            for key in ("description", "result", "resultClose"):
                if detail.get(key):
                    print("    %s: %s" % (key, one_line(detail[key])))
            if n == DETAILED_FAILURES - 1 and failed > DETAILED_FAILURES:
                print("    (details omitted for the remaining %d failures; "
                      "see %s)" % (failed - DETAILED_FAILURES,
                                   os.path.join(reports_dir, "index.html")))
    if missing:
        print()
        print("MISSING: the run was to execute %d cases but the report has %d;"
              " counting %d as failed (did the server stop or refuse "
              "connections?)" % (args.expect_cases, len(ids), missing))

    return finish(passed, failed + missing)


if __name__ == "__main__":
    sys.exit(main())
