#!/usr/bin/env python3
"""Check an Autobahn|Testsuite fuzzingclient report (python3, stdlib only).

Usage: check.py OUTDIR --deflate required|unimplemented
                [--agent duplex] [--expect-cases N]
       check.py --self-test

Reads OUTDIR/reports/index.json (OUTDIR may also be the reports folder),
prints a per-section summary and every failing case, and ends with the line
`autobahn: N passed, M failed`. Exit status 1 if M > 0.

Rules:
  * sections 12 and 13 (permessage-deflate): with --deflate unimplemented the
    behavior must be UNIMPLEMENTED; with --deflate required, OK;
  * every other section (1-10, and any the suite may add): OK (NON-STRICT is
    a failure);
  * behaviorClose must be OK. The suite reports behaviorClose OK for a case
    whose extension was not negotiated (UNIMPLEMENTED) when the closing
    handshake was clean, so nothing else is accepted there;
  * the only exception is the suite's own "undefined by the spec" cases
    (7.1.6, 7.13.1, 7.13.2), which report behavior and behaviorClose
    INFORMATIONAL: there, and nowhere else, INFORMATIONAL is accepted (OK
    too, for both);
  * the report must hold exactly --expect-cases cases (default 517, the
    whole suite): each missing case counts as failed (e.g. when the server
    went away mid-run and wstest skipped the rest), and so does each case
    over the count (a report that is not the run it claims to be).

--self-test runs the rules above on synthetic reports and exits non-zero if
any verdict is wrong.
"""

import argparse
import html
import json
import os
import re
import sys

DEFLATE_SECTIONS = {12, 13}
# The whole fuzzingclient suite ('*') of the pinned Autobahn|Testsuite.
EXPECTED_CASES = 517
# The suite's cases whose outcome the RFC leaves open: they always report
# INFORMATIONAL, which is accepted for them only.
INFORMATIONAL_CASES = {"7.1.6", "7.13.1", "7.13.2"}
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
    passing = ("OK", "INFORMATIONAL") if case_id in INFORMATIONAL_CASES else ("OK",)
    if section in DEFLATE_SECTIONS and deflate == "unimplemented":
        if behavior != "UNIMPLEMENTED":
            reasons.append("permessage-deflate must not be negotiated "
                           "(--deflate unimplemented), so behavior must be "
                           "UNIMPLEMENTED")
    elif behavior not in passing:
        if behavior == "UNIMPLEMENTED":
            reasons.append("permessage-deflate was not negotiated, but "
                           "--deflate required needs OK")
        else:
            reasons.append("behavior must be %s" % " or ".join(passing))
    if behavior_close not in passing:
        reasons.append("behaviorClose must be %s" % " or ".join(passing))
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
    ap.add_argument("outdir", nargs="?",
                    help="run.sh --out folder, or its reports/ folder")
    ap.add_argument("--deflate", choices=["required", "unimplemented"])
    ap.add_argument("--agent", default=None,
                    help="agent name in index.json (default: the only one)")
    ap.add_argument("--expect-cases", type=int, default=EXPECTED_CASES,
                    help="number of cases the run was meant to execute "
                         "(default %(default)s, the whole suite)")
    ap.add_argument("--self-test", action="store_true",
                    help="check these rules on synthetic reports and exit")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    if args.outdir is None or args.deflate is None:
        ap.error("OUTDIR and --deflate are required (or --self-test)")
    if args.expect_cases < 1:
        ap.error("--expect-cases must be at least 1")

    reports_dir = os.path.join(args.outdir, "reports")
    if not os.path.isfile(os.path.join(reports_dir, "index.json")):
        reports_dir = args.outdir
    index_path = os.path.join(reports_dir, "index.json")
    missing_all = args.expect_cases

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
    missing = max(0, args.expect_cases - len(ids))
    extra = max(0, len(ids) - args.expect_cases)

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
    if extra:
        print()
        print("UNEXPECTED: the run was to execute %d cases but the report has "
              "%d; counting %d as failed (a stale or merged report?)"
              % (args.expect_cases, len(ids), extra))
        passed = max(0, passed - extra)

    return finish(passed, failed + missing + extra)


def synthetic_ids(n):
    """n distinct case ids: the three INFORMATIONAL ones, a deflate case in
    sections 12 and 13, and plain section-1 cases for the rest."""
    ids = sorted(INFORMATIONAL_CASES) + ["12.1.1", "13.1.1"]
    ids += ["1.1.%d" % i for i in range(1, n - len(ids) + 1)]
    return ids[:n]


def write_report(folder, cases, agent="duplex", raw=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "index.json"), "w", encoding="utf-8") as f:
        if raw is not None:
            f.write(raw)
        else:
            json.dump({agent: cases}, f)


def all_ok(n=EXPECTED_CASES, deflate_behavior="OK"):
    cases = {}
    for cid in synthetic_ids(n):
        b = "INFORMATIONAL" if cid in INFORMATIONAL_CASES else "OK"
        if section_of(cid) in DEFLATE_SECTIONS:
            b = deflate_behavior
        cases[cid] = {"behavior": b, "behaviorClose": b if b != "UNIMPLEMENTED" else "OK"}
    return cases


def changed(cases, cid, **kw):
    out = {k: dict(v) for k, v in cases.items()}
    out[cid].update(kw)
    return out


def self_test():
    """Each synthetic report with the verdict the rules require."""
    import contextlib
    import io
    import tempfile

    full = all_ok()
    ok_cases = {cid: {"behavior": "OK", "behaviorClose": "OK"}
                for cid in synthetic_ids(EXPECTED_CASES)}
    # (name, cases or raw text, extra argv, expected exit status)
    checks = [
        ("the whole suite, all passing", full, [], 0),
        ("OK for the INFORMATIONAL cases too", ok_cases, [], 0),
        ("one OK case only", {"1.1.1": {"behavior": "OK", "behaviorClose": "OK"}}, [], 1),
        ("one case missing", dict(list(full.items())[:-1]), [], 1),
        ("one case more than expected",
         dict(full, **{"1.2.1": {"behavior": "OK", "behaviorClose": "OK"}}), [], 1),
        ("a smaller run with its count given",
         dict(list(full.items())[:10]), ["--expect-cases", "10"], 0),
        ("a smaller run with a wrong count given",
         dict(list(full.items())[:10]), ["--expect-cases", "11"], 1),
        ("INFORMATIONAL outside 7.1.6/7.13.1/7.13.2",
         changed(full, "1.1.1", behavior="INFORMATIONAL"), [], 1),
        ("behaviorClose INFORMATIONAL outside the three",
         changed(full, "1.1.1", behaviorClose="INFORMATIONAL"), [], 1),
        ("INFORMATIONAL in a deflate section",
         changed(full, "12.1.1", behavior="INFORMATIONAL"), [], 1),
        ("NON-STRICT", changed(full, "1.1.2", behavior="NON-STRICT"), [], 1),
        ("FAILED", changed(full, "7.1.6", behavior="FAILED"), [], 1),
        ("behaviorClose FAILED", changed(full, "1.1.3", behaviorClose="FAILED"), [], 1),
        ("deflate not negotiated but required",
         all_ok(deflate_behavior="UNIMPLEMENTED"), [], 1),
        ("deflate not negotiated, as --deflate unimplemented wants",
         all_ok(deflate_behavior="UNIMPLEMENTED"), ["--deflate", "unimplemented"], 0),
        ("deflate negotiated against --deflate unimplemented",
         full, ["--deflate", "unimplemented"], 1),
        ("no index.json", None, [], 1),
        ("index.json that is not JSON", "{not json", [], 1),
        ("no results for the agent", "{}", [], 1),
        ("an empty agent", '{"duplex": {}}', [], 1),
    ]
    wrong = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, cases, extra, want) in enumerate(checks):
            folder = os.path.join(tmp, str(n))
            os.makedirs(folder)
            if isinstance(cases, dict):
                write_report(folder, cases)
            elif isinstance(cases, str):
                write_report(folder, None, raw=cases)
            argv = [folder]
            if "--deflate" not in extra:
                argv += ["--deflate", "required"]
            argv += extra
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                got = main(argv)
            verdict = "ok" if got == want else "WRONG"
            if got != want:
                wrong += 1
            print("self-test %s: %s (exit %d, want %d)" % (verdict, name, got, want))
            if got != want:
                print("    " + "\n    ".join(out.getvalue().splitlines()[-5:]))
    print("check.py self-test: %d passed, %d failed" % (len(checks) - wrong, wrong))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
