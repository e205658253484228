"""Hostile input on the control endpoint (PRODUCT C2), against the running simulated cart over
its CURVE sockets: more than ten thousand malformed or random requests, then random raw
frames and oversized messages. The server answers or ignores each one, never stops, and the
cart is left exactly as it was - emitting at 50 mW, nothing else changed."""

from __future__ import annotations

import collections

import math

import msgpack
import pytest
import zmq
import zmq.auth
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nirf.services.gateway.bus import MAX_ID_LEN, READ_ONLY
from nirf.services.cli.client import CartClient
from tests.cartproc import start_cart

pytestmark = pytest.mark.e2e

WIDTH, HEIGHT = 728, 544
POWER_MW = 50.0
BATCH = 10  # requests in flight at once on the DEALER socket
EXAMPLES = 1010  # x BATCH = 10,100 requests
REPLY_TIMEOUT_S = 10.0
CODES = {"BAD_REQUEST", "UNKNOWN_COMMAND", "INVALID_ARGUMENT", "NOT_PERMITTED", "WRONG_STATE", "KEY_OFF",
         "INTERLOCK_OPEN", "FAULT_ACTIVE", "NO_CASE", "DEVICE_ERROR", "TIMEOUT", "NOT_AVAILABLE", "BUSY"}
COMMANDS = ["ping", "status", "arm", "disarm", "laser.on", "laser.set", "laser.off", "filter.move", "camera.set",
            "acquire.start", "acquire.stop", "roi.set", "capture", "case.open", "case.close", "pathology.set",
            "report", "fault.reset", "selftest", "sim.set"]


# ---------------------------------------------------------------------- strategies
# Each strategy draws (payload bytes, expectation). The expectation is the id the reply must
# carry (None: a BAD_REQUEST with a null id) and whether it may succeed at all: only the
# read-only commands may, so nothing the fuzzer sends can change the cart.
def _packed(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# msgpack carries integers from -2**63 to 2**64 - 1; anything wider cannot even be sent.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(
    st.none(), st.booleans(), ints,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40),
)
# Two levels of maps and lists (deeper nesting has its own kind below); hypothesis's
# recursive strategy would be about ten times slower to draw.
_flat = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=8), scalars, max_size=4))
_lists = st.lists(_flat, max_size=3)
_maps = st.dictionaries(st.text(max_size=8), _flat, max_size=3)
json_like = st.one_of(scalars, _lists, _maps)
# built, not filtered: filtering a drawn value away is slow and can starve a batch
not_a_map = st.one_of(scalars, _lists)
not_a_string = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.binary(max_size=40), _lists, _maps)
not_a_map_nor_null = st.one_of(st.booleans(), ints, st.floats(), st.text(max_size=40), st.binary(max_size=40), _lists)
valid_ids = st.text(max_size=MAX_ID_LEN)
unknown_keys = st.text(min_size=1, max_size=20).map(lambda s: "zz_" + s)
bad_numbers = st.one_of(
    st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1e6, allow_infinity=False),
    st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")),
    st.text(max_size=10), st.booleans(), st.none(), st.lists(ints, max_size=3),
)


def _with_extra(args: st.SearchStrategy) -> st.SearchStrategy:
    """A map of arguments plus one argument no command knows: always refused."""
    return st.builds(lambda a, k, v: {**a, k: v}, args, unknown_keys, json_like)


# Valid-looking state-changing commands whose arguments are certainly invalid.
bad_state_changes = st.one_of(
    st.tuples(st.sampled_from(["arm", "disarm", "laser.off", "fault.reset", "acquire.stop", "case.close",
                               "selftest"]),
              st.dictionaries(unknown_keys, json_like, min_size=1, max_size=3)),
    st.tuples(st.sampled_from(["laser.on", "laser.set"]),
              st.one_of(st.fixed_dictionaries({"power_mw": bad_numbers}), st.just({}),
                        _with_extra(st.fixed_dictionaries({"power_mw": st.floats(1, 40)})))),
    st.tuples(st.just("filter.move"), st.one_of(
        st.fixed_dictionaries({"position": st.one_of(st.integers(-(2**63), 0), st.integers(13, 2**64 - 1),
                                                     st.floats(allow_nan=False), st.text(max_size=5),
                                                     st.booleans(), st.none())}),
        st.fixed_dictionaries({"name": st.text(max_size=20).filter(
            lambda n: n not in ("icg_emission", "open", "blocked"))}),
        st.just({}),
        st.fixed_dictionaries({"position": st.integers(1, 3), "name": st.sampled_from(["open", "blocked"])}),
    )),
    st.tuples(st.just("camera.set"), st.one_of(
        st.fixed_dictionaries({"exposure_us": st.one_of(st.integers(-(2**63), 9), st.integers(1_000_001, 2**64 - 1),
                                                        st.floats(), st.text(max_size=5), st.none())}),
        st.fixed_dictionaries({"gain": st.one_of(st.floats(max_value=0.99), st.floats(min_value=16.01),
                                                 st.text(max_size=5), st.none(), st.booleans())}),
        st.fixed_dictionaries({"fps": st.one_of(st.floats(max_value=0.99), st.floats(min_value=60.01),
                                                st.text(max_size=5), st.none(), st.booleans())}),
        _with_extra(st.fixed_dictionaries({"gain": st.floats(1, 4)})),
    )),
    st.tuples(st.just("acquire.start"), st.one_of(
        st.fixed_dictionaries({"mode": st.one_of(
            st.text(max_size=12).filter(lambda m: m not in ("fluorescence", "white", "dark")),
            ints, st.none())}),
        st.just({}),
        _with_extra(st.fixed_dictionaries({"mode": st.sampled_from(["white", "dark"])})),
    )),
    st.tuples(st.just("roi.set"), st.one_of(
        st.fixed_dictionaries({"signal": st.lists(st.integers(-10, 10_000), min_size=4, max_size=4),
                               "background": st.lists(ints, max_size=3)}),
        st.fixed_dictionaries({"signal": st.lists(json_like, max_size=5)}),
        st.fixed_dictionaries({"auto": st.one_of(ints, st.text(max_size=5), st.none())}),
        st.just({}),
        _with_extra(st.just({"auto": True})),
    )),
    st.tuples(st.just("sim.set"), _with_extra(st.fixed_dictionaries(
        {}, optional={"interlock": st.just("open"), "key": st.just(False), "ambient_e_per_ms": st.floats(0, 100)}))),
    st.tuples(st.just("case.open"), _with_extra(st.fixed_dictionaries(
        {"case_id": st.text(max_size=20), "histology": st.sampled_from(["DFSP", "sSCC", "x"]),
         "arm": st.sampled_from(["control", "icg_25mg", "?"])}))),
    st.tuples(st.just("capture"), st.fixed_dictionaries(
        {"site": st.text(max_size=10).filter(lambda s: s not in ("gross_tumor", "tumor_bed",
                                                                 "specimen_cross_section")),
         "pairs": st.integers(-5, 0)})),
    st.tuples(st.just("pathology.set"), _with_extra(st.fixed_dictionaries(
        {"capture_id": st.text(max_size=10), "margin_positive": st.booleans()}))),
)


STATE_CHANGING = [c for c in COMMANDS if c not in READ_ONLY]
PAYLOAD_KEYS = st.sampled_from(["id", "cmd", "args", "x"])


def _random_map(body: dict):
    # when it happens to be well formed, the command must still be unknown or read-only
    cmd = body.get("cmd")
    cmd_ok = isinstance(cmd, str) and cmd in READ_ONLY
    if isinstance(cmd, str) and cmd in COMMANDS and not cmd_ok:
        body["cmd"] = "zz." + cmd
    args_ok = body.get("args") is None or isinstance(body.get("args"), dict)
    return _packed(body), None, cmd_ok and args_ok


def _bad_id(bad, cmd: str, with_id: bool):
    body = {"cmd": cmd, "args": {}}
    if with_id:
        body["id"] = bad
    return _packed(body), None, False


def _deep(rid: str, depth: int):
    if depth < 400:
        nested = 1
        for _ in range(depth):
            nested = [nested]
        return _packed({"id": rid, "cmd": "laser.set", "args": {"power_mw": nested}}), rid, False
    # deeper than the packer allows: hand-made bytes (a one-element array, repeated)
    return b"\x91" * depth + b"\x01", None, False


def _huge(rid: str, size: int, where: str, wide: bool):
    blob = "\u00e9" * (size // 2) if wide else "x" * size  # over msgpack's 16 KiB per string
    if where == "cmd":
        return _packed({"id": rid, "cmd": blob}), None, False
    if where == "id":
        return _packed({"id": blob, "cmd": "ping"}), None, False
    return _packed({"id": rid, "cmd": "laser.set", "args": {"power_mw": blob}}), None, False


# Each kind of hostile request: (payload, reply id to expect or None, whether ok is allowed:
# True, False, or None for "either").
KINDS = {
    "bad_state_change": st.builds(lambda rid, ca: (_packed({"id": rid, "cmd": ca[0], "args": ca[1]}), rid, False),
                                  valid_ids, bad_state_changes),
    "random_map": st.builds(_random_map, st.dictionaries(PAYLOAD_KEYS, json_like, max_size=4)),
    "non_map": st.builds(lambda v: (_packed(v), None, False), not_a_map),
    "bad_id": st.builds(_bad_id, st.one_of(ints, st.none(), st.binary(max_size=8), st.lists(st.text(), max_size=2),
                                           st.text(min_size=MAX_ID_LEN + 1, max_size=200)),
                        st.sampled_from(COMMANDS), st.booleans()),
    "bad_cmd": st.builds(lambda rid, c: (_packed({"id": rid, "cmd": c}), rid, False),
                         valid_ids, not_a_string),
    "unknown_cmd": st.builds(lambda rid, c, a: (_packed({"id": rid, "cmd": c, "args": a}), rid, False),
                             valid_ids, st.text(max_size=80).filter(lambda c: c not in COMMANDS),
                             st.dictionaries(st.text(max_size=5), json_like, max_size=3)),
    "bad_args": st.builds(lambda rid, c, a: (_packed({"id": rid, "cmd": c, "args": a}), rid, False),
                          valid_ids, st.sampled_from(COMMANDS),
                          not_a_map_nor_null),
    "non_finite": st.builds(lambda rid, c, x: (_packed({"id": rid, "cmd": c, "args": {"power_mw": [{"x": x}]}}),
                                               rid, False),
                            valid_ids, st.sampled_from(STATE_CHANGING), st.sampled_from([math.nan, math.inf, -math.inf])),
    "deep": st.builds(_deep, valid_ids, st.integers(40, 3000)),
    "huge_string": st.builds(_huge, valid_ids, st.integers(15_000, 40_000), st.sampled_from(["cmd", "arg", "id"]),
                             st.booleans()),
    "garbage_bytes": st.builds(lambda b: (b, None, None), st.binary(max_size=300)),
    # interleaved proof that the server stays useful between the garbage
    "read_only": st.builds(lambda rid, c: (_packed({"id": rid, "cmd": c}), rid, True),
                           valid_ids, st.sampled_from(["ping", "status"])),
}
# state-changing commands with bad arguments are the most interesting: weighted up
fuzz_request = st.one_of(*([KINDS["bad_state_change"]] * 5), *KINDS.values())


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cart(tmp_path_factory):
    c = start_cart(tmp_path_factory.mktemp("fuzz"), width=WIDTH, height=HEIGHT,
                   extra="[laser]\nmax_emission_s = 600.0\n")
    try:
        c.wait_for_keys()
        op = CartClient.from_state_dir(c.state_dir, c.control, c.telemetry, context=zmq.Context())
        op.subscribe("status")
        assert op.wait_for("status", timeout_s=60) is not None, c.log_text()
        c.op = op
        yield c
        op.close()
        op.ctx.destroy(linger=0)
    finally:
        c.stop()


def _dealer(cart) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    keys = cart.state_dir / "keys"
    server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
    public, secret = zmq.auth.load_certificate(str(keys / "local-operator.key_secret"))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    sock.connect(cart.control)
    return ctx, sock


def _snapshot(op: CartClient) -> dict:
    """What must not change: state, laser, wheel, camera, acquisition, ROI, case, world."""
    s = op.call("status")
    sim = s["sim"]
    return {
        "state": s["state"], "faults": s["faults"], "laser_on": s["laser"]["on"],
        "setpoint_mw": s["laser"]["setpoint_mw"], "filter": s["filter"]["position"],
        "camera": (s["camera"]["exposure_us"], s["camera"]["gain"], s["camera"].get("set_fps")),
        "acquisition": s["acquisition"], "roi": s["roi"], "case": s["case"],
        "world": {k: sim[k] for k in ("interlock", "key", "footswitch", "ambient_e_per_ms", "illumination",
                                      "laser_leak", "phantom", "fault", "seed")},
    }


@pytest.fixture(scope="module")
def emitting(cart):
    """The cart emitting at 50 mW, and its snapshot; disarmed afterwards."""
    op = cart.op
    op.call("arm")
    assert op.wait_for("status", lambda m: m["state"] == "ARMED", timeout_s=10) is not None
    op.call("laser.on", {"power_mw": POWER_MW})
    st_ = op.wait_for("status", lambda m: m["state"] == "EMITTING" and m["laser"]["on"], timeout_s=10)
    assert st_ is not None
    yield _snapshot(op)
    op.call("disarm")


def _assert_unchanged(cart, before: dict) -> None:
    op = cart.op
    assert cart.proc.poll() is None, "the cart stopped"
    assert op.call("ping", timeout_s=5)["profile"] == "sim"
    after = _snapshot(op)
    assert after == before
    st_ = op.call("status")
    assert st_["laser"]["power_mw"] == pytest.approx(POWER_MW, rel=0.2), "the optical output moved"


# ---------------------------------------------------------------------- the tests
def test_ten_thousand_hostile_requests_change_nothing(cart, emitting):
    ctx, sock = _dealer(cart)
    sent = {"requests": 0, "answered": 0, "ok": 0}

    # no shrinking: a failure already shows the whole batch, and shrinking 10,000 network
    # round trips would take minutes
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(fuzz_request, min_size=BATCH, max_size=BATCH))
    def batch(requests):
        for payload, _, _ in requests:
            sock.send_multipart([b"", payload])
        sent["requests"] += len(requests)
        # one reply per request; the gateway answers each as its owner does, so replies
        # may come out of order and are matched by id (PROTOCOL: the reply carries the id)
        replies = []
        for payload, _, _ in requests:
            assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), f"no reply (after {len(replies)} of {len(requests)})"
            frames = sock.recv_multipart()
            assert frames[0] == b"" and len(frames) == 2
            reply = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
            sent["answered"] += 1
            assert isinstance(reply, dict) and set(reply) >= {"id", "ok"}, reply
            replies.append(reply)
        may = collections.defaultdict(set)
        for payload, want_id, may_succeed in requests:
            if want_id is not None:
                may[want_id].add(may_succeed)
        for reply in replies:
            if reply["ok"]:
                sent["ok"] += 1
                assert reply["id"] in may and may[reply["id"]] != {False}, f"accepted: {str(reply)[:300]}"
                assert "result" in reply
            else:
                assert reply["error"]["code"] in CODES, reply
                assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
                # a handler that raised something unexpected: a bug, even if the server lived
                assert not reply["error"]["message"].startswith("internal error"), reply
        got_ids = collections.Counter(r["id"] for r in replies)
        want_ids = collections.Counter(w for _, w, _ in requests if w is not None)
        assert not want_ids - got_ids, f"replies missing for ids {list((want_ids - got_ids))[:5]}"
    try:
        batch()
    finally:
        ctx.destroy(linger=0)
    assert sent["requests"] >= 10_000
    assert sent["answered"] == sent["requests"]
    assert sent["ok"] > 0  # the interleaved ping/status kept working throughout
    _assert_unchanged(cart, emitting)


def test_random_raw_frames_are_answered_or_ignored(cart, emitting):
    ctx, sock = _dealer(cart)
    counts = {"messages": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(st.lists(st.binary(max_size=200), min_size=1, max_size=4), min_size=1, max_size=10))
    def frames_batch(messages):
        for frames in messages:
            sock.send_multipart(frames)
        counts["messages"] += len(messages)
        # every message ends in a payload the server can answer: one reply each, routed
        # back through whatever frames came before it
        for frames in messages:
            assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), f"no reply to {frames!r}"
            got = sock.recv_multipart()
            assert got[:-1] == frames[:-1]
            reply = msgpack.unpackb(got[-1], raw=False, strict_map_key=False)
            assert reply["ok"] is False or reply["id"] is not None
    try:
        frames_batch()
        # and a well-formed request on the same connection still works
        sock.send_multipart([b"", msgpack.packb({"id": "after", "cmd": "ping"})])
        assert sock.poll(5000)
        assert msgpack.unpackb(sock.recv_multipart()[-1])["id"] == "after"
    finally:
        ctx.destroy(linger=0)
    assert counts["messages"] >= 150
    _assert_unchanged(cart, emitting)


@pytest.mark.parametrize("size", [64 * 1024 + 1, 1024 * 1024])
def test_an_oversized_message_is_dropped_by_the_socket(cart, emitting, size):
    ctx, sock = _dealer(cart)
    try:
        # a valid-looking request, padded over the limit: it must not reach a handler
        body = msgpack.packb({"id": "big", "cmd": "disarm", "args": {"pad": "x" * size}})
        assert len(body) > 64 * 1024
        sock.send_multipart([b"", body])
        assert not sock.poll(1500), "an oversized message was answered"
    finally:
        ctx.destroy(linger=0)
    _assert_unchanged(cart, emitting)


def test_a_message_just_under_the_limit_is_answered(cart, emitting):
    ctx, sock = _dealer(cart)
    try:
        # the string is below msgpack's 16 KiB limit for one string, the frame below 64 KiB
        pad = {f"k{i}": "y" * 15_000 for i in range(4)}
        body = msgpack.packb({"id": "near", "cmd": "laser.set", "args": pad})
        assert 60_000 < len(body) < 64 * 1024
        sock.send_multipart([b"", body])
        assert sock.poll(5000)
        reply = msgpack.unpackb(sock.recv_multipart()[-1])
        assert reply["id"] == "near" and reply["error"]["code"] == "INVALID_ARGUMENT"
    finally:
        ctx.destroy(linger=0)
    _assert_unchanged(cart, emitting)
