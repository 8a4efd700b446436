"""A fit's row order must depend on every bit of its shuffle seed. torch's CPU generator keeps only a
seed's low 32 bits (``manual_seed(7)`` and ``manual_seed(7 + 2**32)`` draw alike), so the 63-bit seed
made from the owner's secret gave 2^32 orders: by the birthday bound, about 2^16 fits with batches of 16
and as many with 17 hold a pair with one order, the pair a differencing of two fits needs to read one row
(found by a cold review, h33)."""

import pytest
import torch

from fedzmq.worker.training import RowShuffle, Terms, epoch

pytestmark = pytest.mark.timeout(30)


def first_epoch(seed: int, rows: int = 64, batch_size: int = 16) -> list[torch.Tensor]:
    return [index for index, _ in epoch(Terms(), rows, batch_size, RowShuffle(seed))]


def test_seeds_that_differ_above_the_low_32_bits_give_different_orders():
    low = 0x1234_5678
    orders = [torch.cat(first_epoch(low + (high << 32))) for high in range(8)]
    assert all(not torch.equal(orders[0], other) for other in orders[1:])


def test_one_seed_gives_one_order_and_each_epoch_its_own():
    shuffle, again = RowShuffle(2**62 + 5), RowShuffle(2**62 + 5)
    first = [index for index, _ in epoch(Terms(), 64, 16, shuffle)]
    second = [index for index, _ in epoch(Terms(), 64, 16, shuffle)]
    assert all(torch.equal(a, b) for a, b in zip(first, [i for i, _ in epoch(Terms(), 64, 16, again)]))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    assert sorted(torch.cat(first).tolist()) == list(range(64))  # a permutation of the rows


def _mask(seed: int) -> torch.Tensor:
    from fedzmq.worker.randomness import seeded_draws

    with seeded_draws(seed):
        return torch.nn.functional.dropout(torch.ones(256), 0.5, training=True)


def test_a_fits_dropout_masks_depend_on_every_bit_of_their_seed():
    """The same held for the masks of a fit's dropout (``seeded_draws``): seeded through ``manual_seed``, 2^32
    mask streams for 2^63 seeds. The generator's whole state is now drawn from the seed."""
    low = 0x0BAD_CAFE
    masks = [_mask(low + (high << 32)) for high in range(8)]
    assert all(not torch.equal(masks[0], other) for other in masks[1:])
    assert torch.equal(_mask(low + (3 << 32)), masks[3])  # and one seed, one stream


def test_seeded_draws_leave_the_generator_as_it_was():
    before = torch.default_generator.get_state()
    _mask(2**62 + 1)
    assert torch.equal(torch.default_generator.get_state(), before)
