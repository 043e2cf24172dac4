"""``ds logs`` analysis on synthetic access logs: a planted queue-bound slow tail is found, attributed to the queue and
located in time; a planted bad version is flagged by the comparison and an identical pair is not; the tail split is
a hand computation; bad lines are counted with their line numbers; --follow's reader sees appended and partial
lines."""

import orjson
import pytest

from deepseek.ops.logs import LogAnalyzer, LogReadError, LogTail, read_lines
from deepseek.ops.logs.compare import Selection
from deepseek.ops.logs.synthetic import BadVersion, SlowQueue, write_synthetic_log

T0 = 1_796_000_400.0  # 2026-11-30 01:00 UTC
RATE = 50.0


def analyze(paths, **kwargs) -> dict:
    analyzer = LogAnalyzer(**kwargs)
    analyzer.feed(read_lines(paths))
    return analyzer.report(n_resamples=1000)


@pytest.fixture(scope="module")
def planted_log(tmp_path_factory):
    """20k lines (400 s at 50/s); digits waits 400 ms more in the queue between T0+200 s and T0+215 s; chat's
    version 2 is 1.6x slower and fails 6 % of its requests."""
    path = tmp_path_factory.mktemp("logs") / "access.jsonl"
    return write_synthetic_log(path, 20_000, seed=3, start=T0, rate_per_s=RATE,
                               slow_queue=SlowQueue("digits", T0 + 200, T0 + 215, 400.0),
                               bad_version=BadVersion("chat", 2, 1.6, 0.06))


def test_the_planted_slow_tail_is_found_attributed_to_the_queue_and_located(planted_log):
    report = analyze([planted_log], by="model", window_s=10)
    digits = report["groups"]["digits"]
    tail = digits["tail"]
    assert tail["dominant"] == "queue" and tail["share"]["queue"] > 0.9 > tail["rest_share"]["queue"]
    assert tail["threshold_ms"] > 300  # the planted +400 ms, not the ordinary log-normal tail
    # the 10 s windows starting at T0+200 and T0+210 hold the whole tail
    located = {w["start"]: w["share_of_tail"] for w in tail["windows"]}
    assert set(list(located)[:2]) == {T0 + 200, T0 + 210} and located[T0 + 200] + located[T0 + 210] > 0.95
    span = tail["concentration"]  # the shortest span holding 80 % of the tail: those 20 s, 5 % of the log's time
    assert (span["start"], span["end"]) == (T0 + 200, T0 + 220) and span["share_of_requests"] < 0.06
    assert tail["mean_queue_ms"]["tail"] > 400 > 40 > tail["mean_queue_ms"]["rest"]  # the rest: ~3 % planted
    assert all(r["model"] == "digits" and T0 + 200 <= r["time"] < T0 + 215 for r in tail["outliers"])
    others = report["groups"]["minilm"]["tail"]  # no planted effect: its tail is not queue-bound
    assert others["dominant"] == "compute"
    assert report["records"] == 20_000 and report["bad_lines"]["count"] == 0
    assert set(report["groups"]) == {"chat", "digits", "minilm", "(all)"}
    assert sum(g["requests"] for k, g in report["groups"].items() if k != "(all)") == 20_000


def test_a_planted_bad_version_is_flagged_and_an_identical_pair_is_not(planted_log):
    bad = analyze([planted_log], by="version", compare=("model=chat,version=1", "model=chat,version=2"),
                  reservoir=2000)["compare"]
    assert bad["a"]["requests"] > 3 * bad["b"]["requests"] > 0
    for name in ("p50_ms", "p99_ms", "mean_ms", "error_rate"):
        d = bad["differences"][name]
        assert d["significant"] and 0 < d["ci_low"] <= d["difference"] <= d["ci_high"], name
    assert bad["differences"]["error_rate"]["ci_low"] > 0.02  # planted: 6 % against 0.5 %
    # the same model in two windows of the same steady traffic: every interval contains 0
    same = analyze([planted_log], compare=("01:01-01:03", "01:04-01:06"), reservoir=2000)["compare"]
    assert same["a"]["requests"] > 1000 and same["b"]["requests"] > 1000
    for name, d in same["differences"].items():
        assert not d["significant"] and d["ci_low"] <= 0 <= d["ci_high"], name


def test_the_tail_split_batch_and_input_sizes_are_a_hand_computation(tmp_path):
    lines = [{"time": T0 + i, "model": "m", "status": 200, "total_ms": 10.0, "queue_ms": 2.0, "compute_ms": 7.0,
              "batch_size": 4, "tokens_in": 100} for i in range(99)]
    lines.append({"time": T0 + 3600 * 5, "model": "m", "status": 503, "total_ms": 1000.0, "queue_ms": 900.0,
                  "compute_ms": 50.0, "batch_size": 8, "tokens_in": 300, "id": "slow"})
    path = tmp_path / "hand.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    group = analyze([path])["groups"]["m"]
    tail = group["tail"]
    assert tail["requests"] == 1 and tail["outliers"][0]["id"] == "slow"
    assert tail["share"] == pytest.approx({"queue": 0.9, "compute": 0.05, "other": 0.05})
    assert tail["rest_share"] == pytest.approx({"queue": 0.2, "compute": 0.7, "other": 0.1})
    assert (tail["batch_size"], tail["tokens_in"]) == ({"tail": 8, "rest": 4}, {"tail": 300, "rest": 100})
    assert tail["error_rate"] == {"tail": 1.0, "rest": 0.0}
    assert tail["busiest_hour_utc"] == {"hour": 6, "share_of_tail": 1.0, "share_of_requests": 0.01}
    assert group["errors"] == 1 and group["error_rate"] == 0.01 and group["p50_ms"] == pytest.approx(10, rel=0.01)


def test_bad_lines_are_counted_with_line_numbers_and_never_stop_the_analysis(tmp_path):
    good = orjson.dumps({"time": T0, "model": "m", "total_ms": 5.0}) + b"\n"
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"{not json\n" + good + b"\n" + b'{"time": "noon", "total_ms": 3}\n' + b"[1, 2]\n"
                     + b'{"model": "m", "total_ms": 3}\n' + b'{"time": 1, "total_ms": -4}\n'
                     + b'{"time": 1, "total_ms": true}\n' + b"\xff\xfe garbage\n" + good + b'{"time": 1, "total_')
    report = analyze([path])
    assert report["records"] == 3 and report["bad_lines"]["count"] == 8
    first = report["bad_lines"]["first"]
    assert [(b["line"], b["reason"]) for b in first] == [
        (2, "not JSON"), (5, "'time' is not a number"), (6, "not a JSON object"), (7, "no 'time'"),
        (8, "'total_ms' is negative or not finite")]
    assert all(b["path"] == str(path) for b in first) and first[0]["text"] == "{not json"


def test_since_until_and_option_errors(planted_log, tmp_path):
    report = analyze([planted_log], since=T0 + 100, until=T0 + 200)
    assert 4000 < report["records"] < 6000 and report["records"] + report["outside_time_range"] == 20_000
    with pytest.raises(LogReadError, match="does not exist"):
        analyze([tmp_path / "missing.jsonl"])
    with pytest.raises(LogReadError, match="group by one of"):
        LogAnalyzer(by="colour")
    for bad in ("12:00", "version", "colour=red", "13:00-12:00"):
        with pytest.raises(LogReadError):
            Selection.parse(bad)


def test_follow_reader_reads_appended_lines_and_holds_a_partial_last_line(tmp_path):
    path = tmp_path / "growing.jsonl"
    line = orjson.dumps({"time": T0, "model": "m", "total_ms": 5.0}) + b"\n"
    path.write_bytes(line)
    tail = LogTail(path)
    assert [n for _, n, _ in tail.read_new()] == [1]
    assert tail.read_new() == []
    with open(path, "ab") as f:
        f.write(line + line[:10])  # a writer half-way through line 3
    assert [(n, raw) for _, n, raw in tail.read_new()] == [(2, line)]
    with open(path, "ab") as f:
        f.write(line[10:] + line)
    got = tail.read_new()
    assert [(n, raw) for _, n, raw in got] == [(3, line), (4, line)]
    analyzer = LogAnalyzer()
    analyzer.feed(got)
    assert analyzer.report()["records"] == 2
    path.write_bytes(line)  # rotated: a new, shorter file is read from its start
    assert [n for _, n, _ in tail.read_new()] == [1]
