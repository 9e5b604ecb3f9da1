"""pipeline.data.tar: the loader's tar reader gives what tarfile gives, in every format our users' shards come in,
and refuses damaged archives with an error that names the byte."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import tarfile

import pytest

from pipeline.data.tar import TarFormatError, TarStream


def _members(rng: random.Random) -> list[tuple[str, bytes]]:
    out = []
    for i in range(12):
        key = f"n0{i:07d}_{i}"
        out.append((f"{key}.jpg", rng.randbytes(rng.randrange(0, 3000))))
        out.append((f"{key}.cls", str(i % 7).encode()))
    # long and non-ASCII names: pax / GNU extensions, ustar prefix
    out.append(("deep/" * 30 + "k.jpg", b"x" * 700))
    out.append(("caf\u00e9/\u00e9l\u00e8ve.json", b'{"a": 1}'))
    out.append(("p" * 90 + "/" + "q" * 90 + ".txt", b""))  # fits ustar only with the prefix field
    return out


def _write(members, fmt, compress=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            if fmt == tarfile.USTAR_FORMAT and (len(name.encode()) > 255 or not name.isascii()):
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alink")
        link.type = tarfile.SYMTYPE
        link.linkname = "somedir"
        tf.addfile(link)
    raw = buf.getvalue()
    if compress == "gz":
        return gzip.compress(raw)
    if compress == "xz":
        return lzma.compress(raw)
    return raw


def _read_all(stream: TarStream, read_every: int = 1) -> list[tuple[str, bytes | None]]:
    out = []
    i = 0
    while (m := stream.next()) is not None:
        out.append((m.name, stream.read() if i % read_every == 0 else None))
        i += 1
    return out


def _expected(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("compress", [None, "gz", "xz"])
def test_reads_what_tarfile_reads(tmp_path, fmt, compress):
    raw = _write(_members(random.Random(fmt)), fmt, compress)
    path = tmp_path / "shard.tar"
    path.write_bytes(raw)
    expected = _expected(raw)
    assert len(expected) >= 24
    with TarStream.open(str(path)) as s:
        assert _read_all(s) == expected
    # members passed over without reading their data (seeks on a plain local file, reads otherwise)
    with TarStream.open(str(path)) as s:
        got = _read_all(s, read_every=3)
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert got[::3] == expected[::3]


def test_offsets_point_at_the_member_headers(tmp_path):
    raw = _write(_members(random.Random(1)), tarfile.USTAR_FORMAT)
    with TarStream(io.BytesIO(raw)) as s:
        while (m := s.next()) is not None:
            header = raw[m.offset:m.offset + 512]
            assert m.name.endswith(header[:100].split(b"\0", 1)[0].decode())  # ustar: the rest is in the prefix
            assert raw[m.data_offset:m.data_offset + m.size] == s.read()


def test_reads_a_pipe(tmp_path):
    """Non-seekable input (pipe: URLs, HTTP streams): passed-over members are read and dropped."""
    raw = _write(_members(random.Random(2)), tarfile.PAX_FORMAT)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        with os.fdopen(w, "wb") as f:
            f.write(raw)
        os._exit(0)
    os.close(w)
    try:
        with TarStream(os.fdopen(r, "rb")) as s:
            got = _read_all(s, read_every=2)
    finally:
        os.waitpid(pid, 0)
    expected = _expected(raw)
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert got[::2] == expected[::2]


def test_truncated_and_corrupt_archives_raise_naming_the_byte(tmp_path):
    raw = _write(_members(random.Random(3)), tarfile.USTAR_FORMAT)
    expected = _expected(raw)
    # cut anywhere but between members (inside a header, the data or its padding): the members before the cut
    # come out, then an error; cut between members, the archive just looks shorter (the loader compares the
    # member count with info.json)
    with TarStream(io.BytesIO(raw)) as s:
        boundaries = set()
        while (m := s.next()) is not None:
            boundaries.add(m.offset)
            s.read()
    end = expected_end(raw)
    for cut in [*range(1, end, 97), *(b + 600 for b in boundaries)]:
        with TarStream(io.BytesIO(raw[:cut])) as s:
            got = []
            if cut in boundaries:
                got = _read_all(s)
            else:
                with pytest.raises(TarFormatError, match="cut short"):
                    while (m := s.next()) is not None:
                        got.append((m.name, s.read()))
        assert got == expected[:len(got)]
    # a flipped byte in a header: the checksum catches it, with the header's offset
    with TarStream(io.BytesIO(raw)) as s:
        s.next()
        s.read()
        second = s.next().offset
    bad = bytearray(raw)
    bad[second + 10] ^= 0x20
    with TarStream(io.BytesIO(bytes(bad))) as s:
        s.next()
        s.read()
        with pytest.raises(TarFormatError, match=f"checksum at byte {second}"):
            s.next()
    # garbage is not an archive
    with TarStream(io.BytesIO(b"not a tar " * 100)) as s, pytest.raises(TarFormatError):
        s.next()
    # no end-of-archive blocks (a writer killed between members): tolerated, like tarfile
    with TarStream(io.BytesIO(raw[:expected_end(raw)])) as s:
        assert _read_all(s) == expected


def expected_end(raw: bytes) -> int:
    """Offset of the end-of-archive zero blocks."""
    with TarStream(io.BytesIO(raw)) as s:
        while s.next() is not None:
            s.read()
        return s.position - 512


def test_read_twice_is_refused():
    raw = _write([("a.jpg", b"123")], tarfile.USTAR_FORMAT)
    with TarStream(io.BytesIO(raw)) as s:
        s.next()
        assert s.read() == b"123"
        with pytest.raises(ValueError, match="read"):
            s.read()
