"""pretrain.data.tar_reader: the same members as tarfile / webdataset on every header flavour."""

from __future__ import annotations

import io
import random
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from pretrain.data.tar_reader import tar_members


def make_tar(fmt: int, members: list[tuple[str, bytes]], extra=()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for kind, name in extra:  # non-file members first: a directory, a symlink
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "target"
            t.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), random.choice([0, 0.5, 1_700_000_000])
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def reference(blob: bytes) -> list[tuple[str, bytes]]:
    return [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(blob))]


def ours(blob: bytes) -> list[tuple[str, bytes]]:
    return [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(blob))]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_webdatasets_reader(fmt):
    rng = random.Random(fmt)
    members = []
    for i in range(40):
        key = f"k{i:03d}" + ("_" * rng.randint(0, 60) if i % 7 == 0 else "")
        members += [(f"{key}.png", rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000]))),
                    (f"{key}.txt", f"caption {i} é".encode()), (f"{key}.json", b"{}")]
    members.append(("__meta__", b"left out, as webdataset does"))
    if fmt != tarfile.USTAR_FORMAT:  # a name longer than 100 bytes: GNU long-name or PAX path records
        members.append(("d" * 150 + "/x" * 20 + ".png", b"long name"))
    members.append(("dir/sub/" + "p" * 90 + ".txt", b"ustar prefix"))  # split into prefix + name
    blob = make_tar(fmt, members, extra=[(tarfile.DIRTYPE, "dir"), (tarfile.SYMTYPE, "link")])
    got = ours(blob)
    assert got == reference(blob)
    assert len(got) == len(members) - 1


def test_truncated_and_corrupt_archives_raise():
    blob = make_tar(tarfile.PAX_FORMAT, [("a.png", b"x" * 2000), ("a.txt", b"t")])
    with pytest.raises(ValueError, match="truncated"):
        ours(blob[:1536 + 700])  # cut inside a member's data
    with pytest.raises(ValueError, match="truncated"):
        ours(blob[:300])  # cut inside the first header
    bad = bytearray(blob)
    bad[10] ^= 0xFF  # a byte of the first header's name
    with pytest.raises(ValueError, match="checksum"):
        ours(bytes(bad))
    with pytest.raises(ValueError):
        ours(b"this is not a tar file at all" * 40)


def test_short_reads_from_a_network_stream():
    blob = make_tar(tarfile.PAX_FORMAT, [(f"k{i}.txt", bytes([i]) * (i * 97)) for i in range(20)])

    class Trickle(io.RawIOBase):  # returns at most 100 bytes a read, like a slow socket
        def __init__(self, data):
            self.data, self.pos = data, 0

        def read(self, n=-1):
            n = min(100, len(self.data) - self.pos if n < 0 else n)
            chunk = self.data[self.pos:self.pos + n]
            self.pos += len(chunk)
            return chunk

    assert [(m["fname"], m["data"]) for m in tar_members(Trickle(blob))] == reference(blob)
