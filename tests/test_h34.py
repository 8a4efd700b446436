"""Issue 17's contracts as its users run them (helper session h34): the command line's answers to values
that cannot make a run, and what a run over many hosted clients promises."""

import pytest

from fedzmq.cli import main

pytestmark = pytest.mark.timeout(60)

#: (command line after the command, what the one line on stderr says): every one used to end in a
#: traceback (scikit-learn's, Federation's, FitConfig's, numpy's), most after the daemons had started,
#: or to exit 0 having trained nothing (``--rounds 0``, ``--rounds -1``)
BAD_SIMULATE = [
    (["--clients", "0"], "--clients must be >= 1, got 0"),
    (["--daemons", "0"], "--daemons must be >= 1, got 0"),
    (["--clients", "3", "--daemons", "5"], "--daemons 5 is more than --clients 3"),
    (["--fraction", "0"], "--fraction must be > 0 and <= 1, got 0"),
    (["--fraction", "1.5"], "--fraction must be > 0 and <= 1, got 1.5"),
    (["--fraction", "nan"], "--fraction must be > 0 and <= 1, got nan"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--rounds", "-1"], "--rounds must be >= 1, got -1"),
    (["--alpha", "0"], "--alpha must be > 0, got 0"),
    (["--alpha", "-1"], "--alpha must be > 0, got -1"),
    (["--seed", "-1"], "--seed must be >= 0 and <= 4294967295, got -1"),
    (["--samples", "5"], "could not split into 20 shards"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["--local-epochs", "0"], "--local-epochs must be an int >= 1, got 0"),
    (["--local-steps", "-1"], "--local-steps must be an int >= 0, got -1"),
    (["--min-workers", "0"], "--min-workers must be >= 1, got 0"),
    (["--round-timeout", "0"], "--round-timeout must be > 0, got 0"),
    (["--lr", "-1"], "--lr must be >= 0, got -1"),
    (["--secure-aggregation", "--clip", "-1"], "--clip must be > 0, got -1"),
    (["--dp-epsilon", "0"], "--dp-epsilon must be > 0, got 0"),
    (["--dp-epsilon", "4", "--dp-delta", "2"], "--dp-delta must be > 0 and <= 1, got 2"),
    (["--dp-epsilon", "4", "--dp-delta", "1"], "--dp-delta must be > 0 and < 1, got 1"),
]


@pytest.mark.parametrize(("flags", "says"), BAD_SIMULATE, ids=[" ".join(f) for f, _ in BAD_SIMULATE])
def test_simulate_refuses_values_that_cannot_make_a_run_in_one_line_before_any_daemon(tmp_path, capsys, flags,
                                                                                      says):
    out = tmp_path / "run"
    code = main(["simulate", "--clients", "20", "--rounds", "2", "--no-progress", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "Traceback" not in err, err
    assert not (out / "logs").exists(), "no daemon was started"


@pytest.mark.parametrize(("command", "flags", "says"), [
    ("demo", ["--workers", "0"], "--workers must be >= 1, got 0"),
    ("demo", ["--workers", "1000"], "could not split into 1000 shards"),
    ("demo", ["--fraction", "2"], "--fraction must be > 0 and <= 1, got 2"),
    ("train", ["--fraction", "0"], "--fraction must be > 0 and <= 1, got 0"),
    ("train", ["--hidden", "0"], "--hidden must be >= 1, got 0"),
])
def test_demo_and_train_refuse_them_too(tmp_path, capsys, command, flags, says):
    where = ["--worker", "tcp://127.0.0.1:9", "--dataset", "d", "--in-features", "2", "--classes", "2"] \
        if command == "train" else []
    out = tmp_path / "run"
    code = main([command, *where, "--rounds", "1", "--no-progress", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "Traceback" not in err, err
    assert not (out / "logs").exists(), "no daemon was started"
