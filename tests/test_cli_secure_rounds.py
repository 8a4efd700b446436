"""``demo`` and ``simulate`` start their own daemons with the default terms, which join a secure round only of at
least ``--secagg-min-clients`` (3) clients. A run whose rounds take fewer failed every round, and said so only
after its daemons had started (found by h34)."""

import pytest

from fedzmq.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("command", "flags", "says"), [
    ("simulate", ["--clients", "20", "--fraction", "0.1", "--secure-aggregation"],
     "2 clients per round (--fraction 0.1 of 20)"),
    ("simulate", ["--clients", "2", "--daemons", "1", "--dp-epsilon", "8"], "2 clients per round (--fraction 1 of 2)"),
    ("simulate", ["--clients", "20", "--fraction", "0.1", "--sampling", "poisson", "--secure-aggregation"],
     "2 clients per round (--fraction 0.1 of 20)"),
    ("demo", ["--workers", "2", "--secure-aggregation"], "2 clients per round (--fraction 1 of 2)"),
])
def test_a_secure_run_of_fewer_clients_per_round_than_the_daemons_join_is_refused_before_they_start(
        tmp_path, capsys, command, flags, says):
    out = tmp_path / "run"
    code = main([command, "--rounds", "1", "--no-progress", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "--secagg-min-clients" in err and "Traceback" not in err, err
    assert not (out / "logs").exists(), "no daemon was started"
