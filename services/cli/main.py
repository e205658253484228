"""``nirfctl``: the technician's command-line tool for the cart.

Examples::

    nirfctl status
    nirfctl arm
    nirfctl laser on --mw 50
    nirfctl acquire start fluorescence
    nirfctl watch                 # live view until Ctrl-C
    nirfctl --json status         # machine-readable output
    nirfctl call roi.set '{"auto": true}'
    nirfctl keys create alice --out ~/.nirf    # a key pair for a technician
    nirfctl keys authorise ~/.nirf/alice.key --role observer
    nirfctl case open DFSP-014 --histology DFSP --arm icg_25mg --injection-time 2024-05-02T08:30:00+02:00
    nirfctl capture tumor_bed --label "12 o'clock"
    nirfctl pathology set DFSP-014-c002 negative
    nirfctl case close
    nirfctl report --histology DFSP
    nirfctl report --threshold 2.5 --html report.html    # re-scored, as a page to look at
    nirfctl export --case DFSP-014 --out DFSP-014.csv    # or the whole study without --case
    nirfctl backup --dest /media/usb    # a consistent copy of the case database
    nirfctl status --json               # --json may stand anywhere on the line
    nirfctl export --out study.csv --dictionary dictionary.csv   # with the REDCap data dictionary
    nirfctl pool centre-a.csv centre-b.csv --out pooled.csv --html pooled.html

The endpoint and key come from flags, else from the configuration profile
(``--config``, default ``sim``) and its state directory.

Conventions: ``--json`` anywhere on the line prints machine-readable JSON on standard
output (errors too, as ``{"ok": false, "error": {...}}``); ``--version``; human messages and
errors go to standard error; a reader that closes the pipe early (``nirfctl watch | head``)
ends the program quietly. Exit codes: 0 done, 1 refused by the cart, 2 usage or
configuration error (missing key files included), 3 no answer from the cart, 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import zmq.auth

from nirf import config as config_mod
from nirf.hal.errors import DeviceTimeout, NirfError
from nirf.services.common import keys as keys_mod
from nirf.services.cli.client import CartClient, CartError
from nirf.services.study.report import ARMS, HISTOLOGIES

SITES = ("gross_tumor", "tumor_bed", "specimen_cross_section")

EXIT_OK, EXIT_REFUSED, EXIT_NO_ANSWER, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 3, 2, 130
# Flags that may stand anywhere on the line, after the subcommand too.
ANYWHERE_FLAGS = ("--json",)
ANYWHERE_OPTIONS = ("--config", "--endpoint", "--telemetry", "--state-dir", "--server-key", "--key", "--timeout")
CAPTURE_TIMEOUT_S = 90.0
# Commands that take longer than a reply normally does: waited for at least this long.
LONG_TIMEOUTS_S = {"capture": CAPTURE_TIMEOUT_S, "selftest": 30.0}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nirfctl", description="Drive the NIRF imaging cart over its bus.")
    p.add_argument("--config", default="sim", help="profile or TOML file to read endpoints from (default: sim)")
    p.add_argument("--endpoint", help="control endpoint, e.g. tcp://cart.local:5560")
    p.add_argument("--telemetry", help="telemetry endpoint, e.g. tcp://cart.local:5561")
    p.add_argument("--state-dir", help="the cart's state folder (for keys/server.key)")
    p.add_argument("--server-key", help="the cart's public key file (default: <state>/keys/server.key)")
    p.add_argument("--key", help="your secret key file (default: <state>/keys/local-operator.key_secret)")
    p.add_argument("--json", action="store_true", help="print replies as JSON, for scripts (anywhere on the line)")
    p.add_argument("--version", action="version", version=f"nirfctl {_version()}")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("ping", help="is the cart there?")
    sub.add_parser("status", help="the cart's status")
    sub.add_parser("selftest", help="check each device (SAFE, acquisition off; moves the wheel, flashes the indicator)")
    sub.add_parser("arm", help="arm the laser (indicator on, emission after the delay)")
    sub.add_parser("disarm", help="back to SAFE, laser off")
    laser = sub.add_parser("laser", help="laser on/set/off")
    lsub = laser.add_subparsers(dest="action", required=True)
    for name in ("on", "set"):
        lp = lsub.add_parser(name)
        lp.add_argument("--mw", type=float, required=True, help="optical power in milliwatts")
    lsub.add_parser("off")
    fault = sub.add_parser("fault", help="fault reset")
    fault.add_argument("action", choices=["reset"])
    filt = sub.add_parser("filter", help="move the filter wheel")
    filt.add_argument("action", choices=["move"])
    filt.add_argument("target", help="a position number or a name (icg_emission, open, blocked)")
    cam = sub.add_parser("camera", help="camera settings")
    cam.add_argument("action", choices=["set"])
    cam.add_argument("--exposure-us", type=int)
    cam.add_argument("--gain", type=float)
    cam.add_argument("--fps", type=float)
    acq = sub.add_parser("acquire", help="start or stop acquisition")
    acq.add_argument("action", choices=["start", "stop"])
    acq.add_argument("mode", nargs="?", choices=["fluorescence", "white", "dark"])
    roi = sub.add_parser("roi", help="set the regions of interest")
    roi.add_argument("action", choices=["set"])
    roi.add_argument("--signal", type=int, nargs=4, metavar=("X", "Y", "W", "H"))
    roi.add_argument("--background", type=int, nargs=4, metavar=("X", "Y", "W", "H"))
    roi.add_argument("--auto", action="store_true")
    simp = sub.add_parser("sim", help="change the simulated world (sim profile only)")
    simp.add_argument("action", choices=["set"])
    simp.add_argument("changes", help='JSON map, e.g. \'{"interlock": "open"}\'')
    callp = sub.add_parser("call", help="send any command with JSON arguments")
    callp.add_argument("cmd")
    callp.add_argument("args", nargs="?", default="{}", help="JSON map of arguments")
    watch = sub.add_parser("watch", help="live view of state, laser, filter, fps, SBR and faults")
    watch.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    keys = sub.add_parser("keys", help="key management")
    ksub = keys.add_subparsers(dest="action", required=True)
    ksub.add_parser("init", help="create the cart's key pair and the local operator's (if missing)")
    kc = ksub.add_parser("create", help="create a key pair for a technician or a tool")
    kc.add_argument("name")
    kc.add_argument("--out", default=".", help="folder for the new files (default: here)")
    ka = ksub.add_parser("authorise", help="allow a public key file as operator or observer")
    ka.add_argument("public_key")
    ka.add_argument("--role", choices=keys_mod.ROLES, required=True)
    ka.add_argument("--name", help="name to file it under (default: the file's name)")
    _add_clinical_commands(sub)
    bk = sub.add_parser("backup", help="a consistent copy of the case database, to a folder on the cart")
    bk.add_argument("--dest", help="folder on the cart, such as a USB stick (default: <state>/backups)")
    sub.add_parser("doctor", help="check this Pi: groups, devices, udev names, lgpio, camera raw format, black level, trigger, clock").add_argument("--no-camera", action="store_true", help="skip the camera checks")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nirf-cart")
    except Exception:  # noqa: BLE001 - a checkout without installed metadata
        return "unknown"


def split_anywhere_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """Take the flags that may stand anywhere (``--json``) out of the line, and move the
    global options that take a value (``--config FILE`` ...) to its front, up to a ``--``,
    so every subcommand accepts them without declaring them; returns the new line and
    the flags found."""
    front, rest, found = [], [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.split("=", 1)[0]
        if arg in ANYWHERE_FLAGS:
            found.add(arg)
        elif name in ANYWHERE_OPTIONS and rest:
            if "=" in arg:
                front.append(arg)
            else:
                front += argv[i:i + 2]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest, found


def _add_clinical_commands(sub) -> None:
    """``case``, ``capture``, ``pathology``, ``report`` and ``export``: the study workflow."""
    case = sub.add_parser("case", help="open or close the study case")
    csub = case.add_subparsers(dest="action", required=True)
    co = csub.add_parser("open", help="open a case (pseudonymous study code only, never a name)")
    co.add_argument("case_id", help="the study code, e.g. DFSP-014")
    co.add_argument("--histology", required=True, choices=HISTOLOGIES)
    co.add_argument("--arm", required=True, choices=ARMS)
    co.add_argument("--weight-kg", type=float, help="needed for the per-kg arm")
    co.add_argument("--injection-time", help="ISO 8601 with a time zone, e.g. 2024-05-02T08:30:00+02:00")
    co.add_argument("--surgery-date", help="ISO date (default today)")
    co.add_argument("--exclusions-confirmed", action="store_true", default=None,
                    help="the patient meets none of the exclusion criteria (required on the device)")
    co.add_argument("--clock-override-reason", help="go ahead although the clock is not synchronised, and why")
    csub.add_parser("close", help="close the open case")
    cc = csub.add_parser("correct", help="correct a field of a case entered wrongly (the old value is kept)")
    cc.add_argument("case_id")
    cc.add_argument("field", choices=("histology", "weight_kg", "injection_time", "surgery_date", "exclusions_confirmed"))
    cc.add_argument("value", help="the right value (numbers and true as JSON, the rest as text)")
    cc.add_argument("--reason", required=True, help="why the case is corrected")
    cap = sub.add_parser("capture", help="capture a site of the open case (laser emitting, fluorescence running)")
    cap.add_argument("site", choices=SITES)
    cap.add_argument("--label", default="", help="where, e.g. \"12 o'clock\" (no names)")
    cap.add_argument("--pairs", type=int, default=8, help="valid results to average, 1-64 (default 8)")
    cap.add_argument("--override-reason",
                     help="capture although the flat field or today's QC is missing (device profile), and why "
                          "(stored on the capture)")
    cap.add_argument("--clock-override-reason", help="capture although the clock is not synchronised, and why")
    path = sub.add_parser("pathology", help="enter pathology's finding for a capture")
    psub = path.add_subparsers(dest="action", required=True)
    ps = psub.add_parser("set")
    ps.add_argument("capture_id")
    ps.add_argument("margin", choices=["positive", "close", "negative", "indeterminate"],
                    help="the margin's pathology finding")
    ps.add_argument("--reason", help="required when it changes an earlier entry")
    blind = ps.add_mutually_exclusive_group()
    blind.add_argument("--blinded", dest="blinded", action="store_true", default=None,
                       help="the pathologist did not know the fluorescence call")
    blind.add_argument("--not-blinded", dest="blinded", action="store_false")
    _add_study_commands(sub)


def _add_study_commands(sub) -> None:
    """The study's data: ``margin``, ``followup``, ``ae``, ``report``, ``export``, ``pool``."""
    statuses = ("positive", "close", "negative", "indeterminate")
    mg = sub.add_parser("margin", help="the patient's final margin status (every arm)")
    mg.add_argument("action", choices=["set"])
    mg.add_argument("case_id")
    mg.add_argument("status", choices=statuses)
    mg.add_argument("--reason", help="required when it changes an earlier entry")
    fu = sub.add_parser("followup", help="add a follow-up visit")
    fu.add_argument("action", choices=["add"])
    fu.add_argument("case_id")
    fu.add_argument("visit_date", help="ISO date, e.g. 2025-05-02")
    fu.add_argument("--recurrence", action="store_true", help="local recurrence found at the visit")
    fu.add_argument("--reason", help="required when it corrects a visit already entered")
    ae = sub.add_parser("ae", help="add an adverse event")
    ae.add_argument("action", choices=["add"])
    ae.add_argument("case_id")
    ae.add_argument("term")
    ae.add_argument("--grade", type=int, required=True, choices=range(1, 6))
    ae.add_argument("--related", required=True, choices=("not", "unlikely", "possible", "probable", "definite"))
    ae.add_argument("--onset", required=True, help="ISO date")
    rep = sub.add_parser("report", help="the study report (add --html FILE for a page to look at)")
    rep.add_argument("--histology", choices=HISTOLOGIES)
    rep.add_argument("--arm", choices=ARMS)
    rep.add_argument("--threshold", type=float, help="re-score every call at this SBR")
    rep.add_argument("--html", help="also write the report as a self-contained HTML page to this file")
    exp = sub.add_parser("export", help="long CSV of one case or the whole study, read from the case database")
    exp.add_argument("--case", dest="case_id", help="one case (default: the whole study)")
    exp.add_argument("--out", default="-", help="file to write (default: standard output)")
    exp.add_argument("--dictionary", help="also write the REDCap data dictionary to this file")
    pl = sub.add_parser("pool", help="pool several carts' exports into one analysis (no cart needed)")
    pl.add_argument("exports", nargs="+", help="export CSV files")
    pl.add_argument("--out", help="write the pooled records as one long CSV")
    pl.add_argument("--html", help="write the pooled report as an HTML page")
    pl.add_argument("--report", dest="report_out", help="write the pooled report as JSON")


def _request_for(args) -> tuple[str, dict]:
    c = args.command
    if c in ("ping", "status", "arm", "disarm", "selftest"):
        return c, {}
    if c == "laser":
        return f"laser.{args.action}", ({"power_mw": args.mw} if args.action != "off" else {})
    if c == "fault":
        return "fault.reset", {}
    if c == "filter":
        t = args.target
        return "filter.move", ({"position": int(t)} if t.isdigit() else {"name": t})
    if c == "camera":
        a = {k: v for k, v in (("exposure_us", args.exposure_us), ("gain", args.gain), ("fps", args.fps))
             if v is not None}
        return "camera.set", a
    if c == "acquire":
        if args.action == "start":
            if not args.mode:
                raise SystemExit("nirfctl acquire start: give a mode (fluorescence, white, dark)")
            return "acquire.start", {"mode": args.mode}
        return "acquire.stop", {}
    if c == "roi":
        if args.auto:
            return "roi.set", {"auto": True}
        if not (args.signal and args.background):
            raise SystemExit("nirfctl roi set: give --signal X Y W H and --background X Y W H, or --auto")
        return "roi.set", {"signal": list(args.signal), "background": list(args.background)}
    if c == "sim":
        return "sim.set", _json_map(args.changes)
    if c == "call":
        return args.cmd, _json_map(args.args)
    if c == "case":
        if args.action == "close":
            return "case.close", {}
        if args.action == "correct":
            try:
                value = json.loads(args.value)
            except json.JSONDecodeError:
                value = args.value
            if isinstance(value, (dict, list)):
                value = args.value
            return "case.correct", {"case_id": args.case_id, "field": args.field, "value": value,
                                    "reason": args.reason}
        a = {"case_id": args.case_id, "histology": args.histology, "arm": args.arm}
        if args.weight_kg is not None:
            a["weight_kg"] = args.weight_kg
        if args.injection_time:
            a["injection_time"] = args.injection_time
        for key in ("surgery_date", "exclusions_confirmed", "clock_override_reason"):
            if getattr(args, key, None) is not None:
                a[key] = getattr(args, key)
        return "case.open", a
    if c == "capture":
        a = {"site": args.site, "label": args.label, "pairs": args.pairs}
        for key in ("override_reason", "clock_override_reason"):
            if getattr(args, key, None) is not None:
                a[key] = getattr(args, key)
        return "capture", a
    if c == "pathology":
        a = {"capture_id": args.capture_id, "status": args.margin}
        for key in ("reason",):
            if getattr(args, key, None):
                a[key] = getattr(args, key)
        if getattr(args, "blinded", None) is not None:
            a["blinded"] = args.blinded
        return "pathology.set", a
    if c == "margin":
        return "margin.set", {"case_id": args.case_id, "status": args.status,
                              **({"reason": args.reason} if args.reason else {})}
    if c == "followup":
        return "followup.add", {"case_id": args.case_id, "visit_date": args.visit_date,
                                "local_recurrence": args.recurrence, **({"reason": args.reason} if args.reason else {})}
    if c == "ae":
        return "ae.add", {"case_id": args.case_id, "term": args.term, "grade": args.grade,
                          "related": args.related, "onset": args.onset}
    if c == "report":
        return "report", {k: v for k, v in (("histology", args.histology), ("arm", args.arm),
                                            ("threshold", args.threshold)) if v is not None}
    if c == "backup":
        # A relative folder means one relative to here (nirfctl runs on the cart).
        return "backup", ({"dest": os.path.abspath(args.dest)} if args.dest else {})
    raise SystemExit(f"nirfctl: unhandled command {c}")


def _json_map(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"nirfctl: not valid JSON ({err.msg} at character {err.pos}): {text}")
    if not isinstance(value, dict):
        raise SystemExit("nirfctl: the arguments must be a JSON map, e.g. '{\"auto\": true}'")
    return value


def _client(args, cfg) -> CartClient:
    state_dir = Path(args.state_dir) if args.state_dir else cfg.state_dir()
    control = args.endpoint or _local(cfg.bus.control_endpoint)
    telemetry = args.telemetry or _local(cfg.bus.telemetry_endpoint)
    keys_dir = state_dir / "keys"
    server_key = Path(args.server_key) if args.server_key else keys_dir / "server.key"
    client_key = Path(args.key) if args.key else keys_dir / "local-operator.key_secret"
    for path, what in ((server_key, "the cart's public key"), (client_key, "your secret key")):
        if not path.exists():
            raise SystemExit(f"nirfctl: {what} not found at {path}; give --server-key/--key or --state-dir")
    server_public, _ = zmq.auth.load_certificate(str(server_key))
    pub, sec = keys_mod.load_client_keys(client_key)
    return CartClient(control, telemetry, server_public, pub, sec)


def _local(endpoint: str) -> str:
    """A server bound to 0.0.0.0 is reached on loopback from the cart itself."""
    return endpoint.replace("0.0.0.0", "127.0.0.1")


def _print_result(cmd: str, result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": True, "result": result}, default=str))
        return
    if cmd == "status" and isinstance(result, dict):
        print(format_status(result))
    elif cmd == "selftest" and isinstance(result, dict):
        print(format_selftest(result))
    elif cmd == "report" and isinstance(result, dict):
        print(format_report(result))
    elif isinstance(result, dict):
        for k, v in result.items():
            print(f"{k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    else:
        print(result)


def format_status(s: dict) -> str:
    laser = s.get("laser", {})
    filt = s.get("filter", {})
    cam = s.get("camera", {})
    lines = [
        f"state        {s.get('state')}",
        f"laser        {'ON' if laser.get('on') else 'off'}  {laser.get('power_mw', 0):.1f} mW "
        f"(setpoint {laser.get('setpoint_mw', 0):.1f} mW)  temp {laser.get('temp_c')} C",
        f"safety       key {'on' if s.get('key') else 'OFF'}, interlock {s.get('interlock')}, "
        f"foot switch {'held' if s.get('footswitch') else 'released'}, indicator {'on' if s.get('indicator') else 'off'}",
        f"filter       {filt.get('position')} ({filt.get('name')}){' moving' if filt.get('moving') else ''}",
        f"camera       {'streaming' if cam.get('streaming') else 'idle'} {cam.get('fps', 0)} fps, "
        f"{cam.get('exposure_us')} us, gain {cam.get('gain')}, {cam.get('width')}x{cam.get('height')}",
        f"acquisition  {s.get('acquisition')}   case {s.get('case') or '-'}   profile {s.get('profile')}",
    ]
    for f in s.get("faults", []):
        lines.append(f"FAULT        {f.get('code')}: {f.get('message')}")
    return "\n".join(lines)


def format_selftest(result: dict) -> str:
    """One line per device: PASS or FAIL, then what was checked or what failed."""
    lines = [f"self-test    {'PASS' if result.get('ok') else 'FAIL'}"]
    for name, detail in (result.get("devices") or {}).items():
        detail = dict(detail) if isinstance(detail, dict) else {"detail": detail}
        ok = detail.pop("ok", False)
        error = detail.pop("error", None)
        parts = [f"{k} {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                 for k, v in detail.items()]
        text = f"error: {error}" if error else ", ".join(parts)
        lines.append(f"  {name:<12} {'ok  ' if ok else 'FAIL'}  {text}")
    return "\n".join(lines)


def watch(client: CartClient, seconds: float, as_json: bool, out=sys.stdout) -> int:
    """A live view: redraws on each status, shows the latest result's SBR."""
    client.subscribe("status", "result", "event")
    last_result: dict | None = None
    status: dict | None = None
    end = time.monotonic() + seconds if seconds > 0 else None
    silent_since = time.monotonic()
    try:
        while end is None or time.monotonic() < end:
            got = client.receive(0.5)
            if got is None:
                if time.monotonic() - silent_since > 3.0:
                    print("(no telemetry from the cart for 3 s: is it running?)", file=out, flush=True)
                    silent_since = time.monotonic()
                continue
            silent_since = time.monotonic()
            topic, msg, _ = got
            if as_json:
                print(json.dumps({"topic": topic, **msg}, default=str), file=out, flush=True)
                continue
            if topic == "result":
                last_result = msg
                continue
            if topic == "event":
                print(f"event: {msg.get('kind')} {json.dumps({k: v for k, v in msg.items() if k not in ('seq', 't_ns', 'kind')})}",
                      file=out, flush=True)
                continue
            status = msg
            sbr = "-"
            if last_result:
                v = last_result.get("sbr")
                call = "POSITIVE" if last_result.get("positive") else "negative"
                sbr = (f"{v:.2f} ({call}, threshold {last_result.get('threshold')})" if v is not None else "undefined") \
                    + ("" if last_result.get("valid") else f" NOT VALID: {', '.join(last_result.get('flags', []))}")
            if out.isatty():
                out.write("\x1b[H\x1b[2J")
            print(format_status(status), file=out)
            print(f"SBR          {sbr}", file=out)
            print("-" * 60, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def format_report(report: dict) -> str:
    """The report as a table: counts and each proportion with its 95 % intervals."""

    def prop(m: dict) -> str:
        if not m or m.get("value") is None:
            return f"{'-':>7} ({m.get('k', 0)}/{m.get('n', 0)})"
        lo, hi = m["clopper_pearson"]
        return f"{m['value']:7.3f} ({m['k']}/{m['n']}, CP {lo:.3f}-{hi:.3f})"

    lines = []
    for title, key in (("per margin", "groups"), ("per patient", "per_patient")):
        if key not in report:
            continue
        if "per_patient" in report:
            lines.append(f"== accuracy {title} (ICG arms)")
        for g in report.get(key, []):
            n = g.get("counts", {})
            met = g.get("metrics", {})
            lines.append(f"{g.get('histology')} / {g.get('arm')}: tp {n.get('tp')} fp {n.get('fp')} tn {n.get('tn')} "
                         f"fn {n.get('fn')}, positive margins {g.get('positive_margins')}")
            for name in ("sensitivity", "specificity", "ppv", "npv"):
                lines.append(f"    {name:<12} {prop(met.get(name, {}))}")
    flow = report.get("flow")
    if flow:
        lines.append("== flow: " + ", ".join(f"{k} {v}" for k, v in flow.items()))
    for r in report.get("roc", []):
        ci = r.get("auc_ci")
        lines.append(f"== ROC {r['histology']} / {r['arm']}: AUC "
                     + ("-" if r.get("auc") is None else f"{r['auc']:.3f}")
                     + ("" if not ci else f" ({ci[0]:.3f}-{ci[1]:.3f})"))
    for m in report.get("margins_by_arm", []):
        arms = ", ".join(f"{a['arm']} {a['positive']}/{a['n']}" for a in m["arms"])
        p = m["test"].get("p")
        lines.append(f"== positive margins {m['histology']}: {arms}; {m['test']['method']} p "
                     + ("-" if p is None else f"{p:.4f}"))
    for r in report.get("recurrence", []):
        arms = ", ".join(f"{a['arm']} " + ("-" if a["km_24m"] is None else f"{a['km_24m']:.3f}")
                         + f" ({a['events']} events of {a['with_followup']})" for a in r["arms"])
        p = r.get("logrank_p")
        lines.append(f"== 24-month recurrence {r['histology']}: {arms}; log-rank p "
                     + ("-" if p is None else f"{p:.4f}"))
    for a in report.get("adverse_events", []):
        lines.append(f"== adverse events {a['arm']}: {a['patients_with_ae']} of {a['n']} patients, "
                     f"by worst grade {a['by_grade']}")
    return "\n".join(lines) if lines else "(no data)"


def export_command(args, cfg) -> int:
    """Long CSV straight from the case database in the state folder (no cart needed), and
    optionally the REDCap data dictionary."""
    from nirf.services.study.casestore import CaseStore

    state_dir = Path(args.state_dir) if args.state_dir else cfg.state_dir()
    db = state_dir / "study.db"
    if not db.exists():
        print(f"nirfctl export: no case database at {db}; give --state-dir", file=sys.stderr)
        return EXIT_USAGE
    with CaseStore.from_config(db, cfg) as store:
        if args.json and args.out == "-":
            # JSON on standard output: the rows as maps (the CSV's columns as keys).
            import csv
            import io

            buf = io.StringIO()
            rows = store.export_csv(buf, case_id=args.case_id)
            records = list(csv.DictReader(io.StringIO(buf.getvalue())))
            print(json.dumps({"ok": True, "result": {"rows": rows, "case_id": args.case_id,
                                                     "records": records}}))
            return EXIT_OK
        if args.out == "-":
            rows = store.export_csv(sys.stdout, case_id=args.case_id)
        else:
            rows = store.export_csv(args.out, case_id=args.case_id)
        if args.dictionary:
            store.export_dictionary(args.dictionary)
    if args.json:
        print(json.dumps({"ok": True, "result": {"rows": rows, "case_id": args.case_id,
                                                 "out": os.path.abspath(args.out),
                                                 "dictionary": os.path.abspath(args.dictionary)
                                                 if args.dictionary else None}}))
        return EXIT_OK
    what = f"case {args.case_id}" if args.case_id else "the study"
    print(f"exported {rows} record row(s) of {what}" + ("" if args.out == "-" else f" to {args.out}")
          + (f", data dictionary in {args.dictionary}" if args.dictionary else ""), file=sys.stderr)
    return EXIT_OK


def pool_command(args, cfg) -> int:
    """Pool exports into one analysis: conflicts on standard error, the report as asked."""
    from nirf.services.study.casestore import _write_atomically
    from nirf.services.study import page, pool, records
    from nirf.services.study.report import ReportOptions, build_study_report

    data, summary = pool.pool(pool.read_exports(args.exports))
    study = cfg.study.as_dict()
    options = ReportOptions(close_as=study["close_as"], indeterminate_as=study["indeterminate_as"],
                            bootstrap_resamples=study["bootstrap_resamples"], bootstrap_seed=study["bootstrap_seed"])
    report = build_study_report(data, options=options)
    report["pooling"] = summary
    if args.out:
        _write_atomically(args.out, records.csv_text(data))
    if args.html:
        _write_atomically(args.html, page.render(report, title="NIRF study report (pooled)"))
    if args.report_out:
        _write_atomically(args.report_out, json.dumps(report, indent=1, default=str))
    for c in summary["conflicts"]:
        print(f"conflict ({c['kind']}): centre {c.get('centre_id')} case {c.get('case_id')}: "
              f"{json.dumps(c.get('fields', c.get('records')), default=str)}", file=sys.stderr)
    print(f"pooled {len(args.exports)} export(s): {summary['patients']} patient(s), "
          f"{len(summary['merged'])} merged, {len(summary['conflicts'])} conflict(s)", file=sys.stderr)
    if not (args.out or args.html or args.report_out):
        _print_result("report", report, args.json)
    return EXIT_OK


def keys_command(args, cfg) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else cfg.state_dir()
    if args.action == "init":
        keys_mod.ensure_sim_keys(state_dir)
        print(f"keys ready in {state_dir / 'keys'}")
    elif args.action == "create":
        public, secret = keys_mod.create_keypair(Path(args.out), args.name)
        print(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)\n"
              f"On the cart: nirfctl keys authorise {public.name} --role operator|observer")
    elif args.action == "authorise":
        dest = keys_mod.authorise(state_dir, Path(args.public_key), args.role, args.name)
        print(f"authorised as {args.role}: {dest} (the cart picks it up within a few seconds)")
    return EXIT_OK


def main(argv=None) -> int:
    """Run one command line; returns the exit code. A closed output pipe and Ctrl-C end
    it quietly (no traceback)."""
    try:
        return _main(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise  # argparse's own exits (--help, --version, usage) keep their status
        # A usage problem found after parsing: exit 2 like argparse's, JSON too with --json.
        argv_given = sys.argv[1:] if argv is None else argv
        if "--json" in split_anywhere_flags(list(argv_given))[1]:
            print(json.dumps({"ok": False, "error": {"code": "USAGE", "message": exc.code.removeprefix("nirfctl: ")}}))
        print(exc.code, file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``| head``): nothing more can be said on standard output.
        # Point it at /dev/null so the interpreter's final flush does not complain.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, anywhere = split_anywhere_flags(argv)
    args = _parser().parse_args(argv)
    args.json = args.json or "--json" in anywhere
    try:
        cfg = config_mod.load(args.config)
        if args.command == "keys":
            return keys_command(args, cfg)
        if args.command == "export":
            return export_command(args, cfg)
        if args.command == "doctor":
            from nirf.services.cli.doctor import doctor_command  # imported only for this command
            return doctor_command(args, cfg)
        if args.command == "pool":
            return pool_command(args, cfg)
        client = _client(args, cfg)
    except NirfError as err:
        if args.json:
            print(json.dumps({"ok": False, "error": {"code": getattr(err, "code", "ERROR"), "message": str(err)}}))
        print(f"nirfctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "watch":
            return watch(client, args.seconds, args.json)
        cmd, cmd_args = _request_for(args)
        try:
            # a capture takes its pairs' time plus the writing; the cart bounds it itself
            timeout_s = max(args.timeout, LONG_TIMEOUTS_S[cmd]) if cmd in LONG_TIMEOUTS_S else args.timeout
            result = client.call(cmd, cmd_args, timeout_s=timeout_s)
        except CartError as err:
            if args.json:
                print(json.dumps({"ok": False, "error": {"code": err.code, "message": err.message}}))
            else:
                print(f"refused: {err.code}: {err.message}", file=sys.stderr)
            return EXIT_REFUSED
        except DeviceTimeout:
            msg = f"no answer from the cart at {client.control} within {timeout_s} s (is it running? right endpoint and keys?)"
            if args.json:
                print(json.dumps({"ok": False, "error": {"code": "TIMEOUT", "message": msg}}))
            else:
                print(f"nirfctl: {msg}", file=sys.stderr)
            return EXIT_NO_ANSWER
        if cmd == "report" and getattr(args, "html", None):
            from nirf.services.study.casestore import _write_atomically
            from nirf.services.study import page

            _write_atomically(args.html, page.render(result))
            print(f"report page written to {args.html}", file=sys.stderr)
        _print_result(cmd, result, args.json)
        return EXIT_OK
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
