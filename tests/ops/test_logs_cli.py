"""``ds logs`` as a user runs it (in process, through the CLI's own error handling): tables, JSON, PNGs, and one-line
errors for a missing file or a bad option."""

import json

import pytest

from deepseek.ops.logs.synthetic import BadVersion, SlowQueue, write_synthetic_log

T0 = 1_796_000_400.0


def run_ds(ds_main, *args) -> tuple[int, str, str]:
    result = ds_main(*args)
    return result.returncode, result.stdout, result.stderr


def test_logs_prints_tables_and_writes_json_and_plots(tmp_path, ds_main):
    log = write_synthetic_log(tmp_path / "access.jsonl", 3_000, seed=5, start=T0,
                              slow_queue=SlowQueue("digits", T0 + 20, T0 + 22, 300.0),
                              bad_version=BadVersion("chat", 2, 2.0, 0.1))
    with open(log, "ab") as f:
        f.write(b"oops\n")
    code, out, err = run_ds(ds_main, "logs", log, "--by", "version", "--window", "30s", "--json",
                            tmp_path / "r.json", "--plots", tmp_path / "plots", "--top", "3", "--compare",
                            "model=chat,version=1", "model=chat,version=2", "--quiet")
    assert code == 0, err
    for text in ("latency by version", "the slowest 1%", "outliers: the 3 slowest", "95% CI", "changed",
                 "1 of 3,001 lines could not be read", f"{log}:3001: not JSON"):
        assert text in out, text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["records"] == 3_000 and set(report["groups"]) == {"1", "2", "(all)"}
    assert report["compare"]["differences"]["p99_ms"]["significant"]
    for name in ("logs-latency.png", "logs-timeline.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, says", [
    (["missing.jsonl"], "does not exist"),
    (["{log}", "--window", "soon"], "bad duration"),
    (["{log}", "--compare", "version=1", "lunchtime"], "--compare 'lunchtime'"),
    (["{log}", "--since", "yesterday"], "bad time"),
    (["{log}", "--by", "colour"], "group by one of"),
])
def test_bad_input_is_one_line(tmp_path, ds_main, args, says):
    log = tmp_path / "access.jsonl"
    log.write_text('{"time": 1, "total_ms": 2}\n')
    args = [str(tmp_path / a) if a == "missing.jsonl" else a.format(log=log) for a in args]
    code, out, err = run_ds(ds_main, "logs", *args)
    assert code != 0 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
