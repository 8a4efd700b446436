"""SecAgg+ in the scheduler: a secure round of 100 clients hosted by two real daemons (``--clients-from``)
runs on a sparse graph, each client receiving only its neighbours' keys and shares, and its model equals
plain FedAvg of the same clients' updates within the quantization bound."""

import pytest
import torch

import fedzmq as fz
from fedzmq.examples import population
from fedzmq.federated.secure import SecAgg
from fedzmq.testing.plugin import TEST_SETTINGS

CLIENTS = 100


@pytest.mark.timeout(600)
async def test_a_secure_round_of_100_hosted_clients_runs_secaggplus(fedzmq_daemons, tmp_path):
    data = population.prepare(tmp_path / "data", CLIENTS, 2, seed=1)
    # a hosted client's session idles while its daemon works through the other 49 clients' steps: on a
    # loaded machine that can outlast the default 60 s session timeout
    terms = ["--min-batch-size", "8", "--min-metric-rows", "1", "--session-timeout", "600", "--secagg-allow-sparse"]
    handles = await fedzmq_daemons("plus0", "plus1", args={
        f"plus{k}": ["--clients-from", f"{population.DATASET}={folder}", *terms]
        for k, folder in enumerate(data.folders)})
    workers = []
    for handle in handles:
        workers += await fz.connect_clients(handle.address, settings=TEST_SETTINGS)
    try:
        assert len(workers) == CLIENTS
        fit = fz.FitConfig(dataset=population.DATASET, steps=1, batch_size=8)
        plain_model = population.make_model(data.features, data.classes, hidden=16, seed=0)
        secure_model = population.make_model(data.features, data.classes, hidden=16, seed=0)
        strategy = SecAgg(fz.FedAvg(), clip=100.0)
        expected = strategy.graph_for(CLIENTS)
        assert expected.degree is not None and expected.degree < CLIENTS - 1  # sparse at n = 100
        secure = fz.Federation(workers, secure_model, fit, strategy, seed=5, round_timeout=300)
        metrics = await secure.run_round()
        assert metrics.extra["secure_aggregation"] and metrics.extra["secagg_degree"] == expected.degree
        assert metrics.extra["threshold"] == expected.threshold
        assert len(metrics.participants) == CLIENTS and not metrics.dropped
        plain = fz.Federation(workers, plain_model, fit, fz.FedAvg(), seed=5, round_timeout=300)
        await plain.run_round()
        bound = metrics.extra["quantization_error_bound"] + 1e-5
        for name, value in plain_model.state_dict().items():
            assert torch.allclose(secure_model.state_dict()[name], value, atol=bound), name
    finally:
        for worker in workers:
            await worker.close()
