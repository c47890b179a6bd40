"""The two buffers of the bulk pull path, on their own: runner.ChunkBuffer (in place of
paramiko's BufferedPipe on a channel) and backup._HashingWriter (hash + write in batches).
End-to-end pulls over real SSH are in tests/e2e/test_backup_restore.py."""

import hashlib
import os
import threading

import pytest
from paramiko.buffered_pipe import PipeTimeout

from deployment import backup as bk
from deployment.errors import DeployError
from deployment.runner import ChunkBuffer


def test_chunks_come_out_whole_in_order_and_split_only_when_asked():
    buf = ChunkBuffer()
    for part in (b"abc", b"defgh", b"i"):
        buf.feed(part)
    assert len(buf) == 9 and buf.read_ready()
    assert buf.read(100) == b"abc"
    assert buf.read(2) == b"de"
    assert buf.read(100) == b"fgh"
    assert buf.read(100) == b"i"
    assert len(buf) == 0 and not buf.read_ready()


def test_read_waits_for_data_and_times_out_like_paramiko():
    buf = ChunkBuffer()
    with pytest.raises(PipeTimeout):
        buf.read(10, timeout=0.0)
    with pytest.raises(PipeTimeout):
        buf.read(10, timeout=0.05)
    threading.Timer(0.05, buf.feed, args=(b"late",)).start()
    assert buf.read(10, timeout=5) == b"late"


def test_close_ends_a_waiting_read_and_keeps_what_was_buffered():
    buf = ChunkBuffer()
    buf.feed(b"last")
    buf.close()
    assert buf.read(10) == b"last"
    assert buf.read(10) == b""
    waiting = ChunkBuffer()
    threading.Timer(0.05, waiting.close).start()
    assert waiting.read(10, timeout=5) == b""


def test_event_tracks_whether_a_read_would_return_at_once():
    buf = ChunkBuffer()
    event = threading.Event()
    buf.set_event(event)
    assert not event.is_set()
    buf.feed(b"x")
    assert event.is_set()
    buf.read(10)
    assert not event.is_set()
    buf.feed(b"yz")
    assert buf.empty() == b"yz" and not event.is_set()
    buf.close()
    assert event.is_set()


def write_through(tmp_path, chunks, batch=None):
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = bk._HashingWriter(fd, path)
        if batch:
            w.BATCH = batch
            w.buf = bytearray(batch)
            w.view = memoryview(w.buf)
        for c in chunks:
            w.add(c)
        w.flush()
    finally:
        os.close(fd)
    return w, path.read_bytes()


@pytest.mark.parametrize("sizes", [[], [1], [5, 5, 5, 5], [3, 16, 1, 40, 7, 8, 8], [100]])
def test_hashing_writer_writes_and_hashes_exactly_what_came_across_batch_edges(tmp_path, sizes):
    chunks = [os.urandom(n) for n in sizes]
    w, written = write_through(tmp_path, chunks, batch=16)
    assert written == b"".join(chunks)
    assert w.digest.hexdigest() == hashlib.sha256(written).hexdigest()
    assert w.written == len(written)


def test_hashing_writer_reports_a_write_failure_as_such(tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        w = bk._HashingWriter(fd, path)
        with pytest.raises(DeployError, match=r"writing .*ro\.bin failed"):
            w.add(b"x" * (w.BATCH + 1))
    finally:
        os.close(fd)


def test_hashing_writer_handles_a_real_size_stream(tmp_path):
    # SSH-packet-sized pieces across 1 MiB batches, and more than one writeback range.
    chunks = [os.urandom(255 << 10) for _ in range(20)] + [b"tail"]
    w, written = write_through(tmp_path, chunks * 8)
    assert len(written) == 8 * (20 * (255 << 10) + 4)
    assert w.digest.hexdigest() == hashlib.sha256(written).hexdigest()


def test_line_writer_drops_compose_warnings_that_contradict_the_tool():
    import io

    from deployment.runner import COMPOSE_NOISE, LineWriter

    out = io.StringIO()
    w = LineWriter(out, "h | ", drop=COMPOSE_NOISE)
    w.write('time="x" level=warning msg="service \\"web\\": deploy.update_config: ')
    w.write('deploy.update_config only applies to rolling updates in Swarm mode"\n Container web Started\n')
    w.finish()
    assert out.getvalue() == "h |  Container web Started\n"
