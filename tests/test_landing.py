"""fedzmq.landing: a stream's pieces, received from a real tcp socket, land in a new tensor by moving
their pages where the kernel allows it, and by copying otherwise; the bytes are the same either way."""

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq

from fedzmq.landing import ADOPT_MIN_BYTES, PAGE, Landing, can_adopt_pages

MIB = 1 << 20
PIECE = 64 * MIB

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair():
    """Two connected PAIR sockets over loopback tcp: frames received are libzmq's own allocations."""
    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for sock in (sender, receiver):
        sock.setsockopt(zmq.LINGER, 0)
    port = sender.bind_to_random_port("tcp://127.0.0.1")
    receiver.connect(f"tcp://127.0.0.1:{port}")
    yield sender, receiver
    sender.close()
    receiver.close()
    ctx.term()


def transmit(pair, data: torch.Tensor, piece: int) -> list[tuple[int, torch.Tensor, zmq.Frame]]:
    """``data``'s bytes through the socket in pieces: (offset, received bytes, their frame)."""
    sender, receiver = pair
    flat = data.view(-1).view(torch.uint8)
    offsets = range(0, flat.numel(), piece)
    for offset in offsets:
        sender.send(memoryview(flat[offset:offset + piece].numpy()), copy=False)
    received = []
    for offset in offsets:
        frame = receiver.recv(copy=False)
        received.append((offset, torch.frombuffer(frame.buffer, dtype=torch.uint8), frame))
    return received


needs_page_moves = pytest.mark.skipif(not can_adopt_pages(), reason="pages move only on Linux")


@needs_page_moves
def test_received_pieces_land_by_moving_their_pages(pair):
    data = torch.randint(0, 1 << 30, ((5 * PIECE + 12345) // 4,), dtype=torch.int32)  # a short last piece
    landing = Landing(torch.int32, data.shape, adopt_pages=True)
    pieces = transmit(pair, data, PIECE)
    for offset, piece, _ in pieces:
        landing.put(offset, piece)
    out = landing.tensor()
    assert torch.equal(out, data)
    # the five full pieces moved, except the partial pages at their ends; the short last one was copied
    assert 5 * (PIECE - PAGE) <= landing.adopted_bytes <= 5 * PIECE
    # moved, not copied: the received frames' pages are gone (they read as zeros now)
    first = pieces[0][1]
    assert int(first[PAGE:PIECE - PAGE].count_nonzero()) == 0
    del landing, pieces, first
    gc.collect()
    assert torch.equal(out, data)  # the tensor keeps its memory alive without the landing


@needs_page_moves
def test_pieces_land_on_several_threads_in_any_order(pair):
    data = torch.randn(6 * PIECE // 8, dtype=torch.float64)
    landing = Landing(torch.float64, (6, PIECE // 8), adopt_pages=True)
    pieces = transmit(pair, data, PIECE)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: landing.put(p[0], p[1]), reversed(pieces)))
    assert torch.equal(landing.tensor().view(-1), data)
    assert landing.adopted_bytes >= 6 * (PIECE - PAGE)


def test_without_adoption_pieces_are_copied_and_left_intact(pair):
    data = torch.randint(0, 255, (3 * PIECE,), dtype=torch.uint8)
    landing = Landing(torch.uint8, data.shape, adopt_pages=False)
    pieces = transmit(pair, data, PIECE)
    for offset, piece, _ in pieces:
        landing.put(offset, piece)
    assert torch.equal(landing.tensor(), data)
    assert landing.adopted_bytes == 0
    assert all(torch.equal(piece, data[offset:offset + PIECE]) for offset, piece, _ in pieces)


@needs_page_moves
def test_pieces_out_of_line_with_the_destination_are_copied(pair):
    """Pieces whose length is not a whole number of pages start at a different offset in their page
    than their place in the destination: they cannot move, and are copied."""
    piece = PIECE + 100
    data = torch.randint(0, 255, (3 * piece,), dtype=torch.uint8)
    landing = Landing(torch.uint8, data.shape, adopt_pages=True)
    for offset, received, _ in transmit(pair, data, piece):
        landing.put(offset, received)
    assert torch.equal(landing.tensor(), data)
    assert landing.adopted_bytes <= piece  # only the first piece lines up


@needs_page_moves
def test_a_start_that_would_misalign_the_dtype_falls_back_to_copies(pair):
    """libzmq's large messages start 56 bytes into a page; complex128 needs 16-byte alignment, so the
    tensor starts on a page boundary and every piece is copied."""
    data = torch.randn(2 * PIECE // 16, dtype=torch.complex128)
    landing = Landing(torch.complex128, data.shape, adopt_pages=True)
    pieces = transmit(pair, data, PIECE)
    shift = pieces[0][1].data_ptr() % PAGE
    for offset, piece, _ in pieces:
        landing.put(offset, piece)
    out = landing.tensor()
    assert torch.equal(out, data)
    assert out.data_ptr() % 16 == 0
    if shift % 16:
        assert landing.adopted_bytes == 0


@needs_page_moves
def test_a_piece_past_the_end_is_refused_before_anything_moves(pair):
    data = torch.randint(0, 255, (2 * PIECE,), dtype=torch.uint8)
    landing = Landing(torch.uint8, (PIECE,), adopt_pages=True)
    (_, first, _), (_, second, _) = transmit(pair, data, PIECE)
    with pytest.raises(ValueError, match="runs past"):
        landing.put(PIECE, second)
    assert torch.equal(second, data[PIECE:])  # nothing moved
    landing.put(0, first)
    assert torch.equal(landing.tensor(), data[:PIECE])


def test_small_tensors_never_move_pages(pair):
    data = torch.arange(ADOPT_MIN_BYTES // 8 - 1, dtype=torch.int64)
    landing = Landing(torch.int64, data.shape, adopt_pages=True)
    for offset, piece, _ in transmit(pair, data, 4 * MIB):
        landing.put(offset, piece)
    assert torch.equal(landing.tensor(), data)
    assert landing.adopted_bytes == 0
