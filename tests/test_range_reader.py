"""RangeReader: contiguous reads decoded straight from chunk files, against zarr's own reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from mars_scale.store import RangeReader

N = 100
CHUNK = 7


def _values(dtype) -> np.ndarray:
    values = np.random.default_rng(0).integers(1, 1000, N).astype(dtype)
    values[CHUNK * 2 : CHUNK * 3] = 0  # a chunk of fill values: zarr does not write it
    return values


def _array(path: Path, dtype, *, zarr_format: int, shards: bool, compressed: bool) -> zarr.Array:
    kwargs = {"shards": (CHUNK * 3,)} if shards else {}
    if compressed:
        if zarr_format == 3:
            from zarr.codecs import BloscCodec

            kwargs["compressors"] = [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")]
        else:
            from numcodecs import Blosc

            kwargs["compressors"] = Blosc(cname="lz4", clevel=3, shuffle=Blosc.SHUFFLE)
    else:
        kwargs["compressors"] = None
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    array = root.create_array("a", shape=(N,), dtype=dtype, chunks=(CHUNK,), fill_value=0, **kwargs)
    array[:] = _values(dtype)
    return zarr.open_group(path, mode="r")["a"]


LAYOUTS = [
    pytest.param(2, False, True, id="v2-blosc"),
    pytest.param(2, False, False, id="v2-raw"),
    pytest.param(3, False, True, id="v3-blosc"),
    pytest.param(3, True, True, id="v3-sharded-blosc"),
    pytest.param(3, True, False, id="v3-sharded-raw"),
]


@pytest.mark.parametrize("zarr_format,shards,compressed", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_every_range_equals_numpy(tmp_path, zarr_format, shards, compressed, dtype):
    array = _array(
        tmp_path / "a.zarr", dtype, zarr_format=zarr_format, shards=shards, compressed=compressed
    )
    reader = RangeReader(array)
    assert reader.direct
    expected = _values(dtype)
    for start in range(0, N + 1, 3):
        for stop in range(start, N + 1, 4):
            got = reader.read(start, stop)
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, expected[start:stop])


def test_reads_into_a_slice_and_casts(tmp_path):
    array = _array(tmp_path / "a.zarr", np.float32, zarr_format=3, shards=True, compressed=True)
    reader = RangeReader(array)
    buffer = np.full(50, -1.0, dtype=np.float32)
    assert reader.read(5, 40, out=buffer[10:45]).base is buffer
    np.testing.assert_array_equal(buffer[10:45], _values(np.float32)[5:40])
    assert (buffer[:10] == -1).all() and (buffer[45:] == -1).all()
    wide = reader.read(3, 30, out=np.empty(27, dtype=np.float64))
    np.testing.assert_array_equal(wide, _values(np.float32)[3:30])
    with pytest.raises(ValueError, match="out has shape"):
        reader.read(0, 10, out=np.empty(9, dtype=np.float32))
    with pytest.raises(ValueError, match="outside"):
        reader.read(90, N + 1)


def test_other_codecs_go_through_zarr(tmp_path):
    from zarr.codecs import ZstdCodec

    root = zarr.open_group(tmp_path / "z.zarr", mode="w", zarr_format=3)
    array = root.create_array(
        "a", shape=(N,), dtype=np.int32, chunks=(CHUNK,), compressors=[ZstdCodec()]
    )
    array[:] = np.arange(N, dtype=np.int32)
    reader = RangeReader(zarr.open_group(tmp_path / "z.zarr", mode="r")["a"])
    assert not reader.direct
    np.testing.assert_array_equal(reader.read(4, 61), np.arange(4, 61))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_big_endian_goes_through_zarr(tmp_path, zarr_format):
    from zarr.codecs import BytesCodec

    kwargs = {"serializer": BytesCodec(endian="big")} if zarr_format == 3 else {}
    root = zarr.open_group(tmp_path / "b.zarr", mode="w", zarr_format=zarr_format)
    array = root.create_array(
        "a", shape=(N,), dtype=">i4", chunks=(CHUNK,), compressors=None, **kwargs
    )
    array[:] = np.arange(N)
    reader = RangeReader(zarr.open_group(tmp_path / "b.zarr", mode="r")["a"])
    assert not reader.direct
    np.testing.assert_array_equal(reader.read(3, 50), np.arange(3, 50))


def test_corrupt_shard_index_is_an_error(tmp_path):
    array = _array(tmp_path / "a.zarr", np.float32, zarr_format=3, shards=True, compressed=True)
    shard = tmp_path / "a.zarr" / "a" / "c" / "1"
    blob = bytearray(shard.read_bytes())
    blob[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(blob))
    reader = RangeReader(array)
    np.testing.assert_array_equal(reader.read(0, 21), _values(np.float32)[:21])  # shard 0 intact
    with pytest.raises(ValueError, match="checksum"):
        reader.read(21, 30)


@pytest.mark.parametrize("zarr_format,shards", [(2, False), (3, True)])
def test_truncated_or_misdeclared_chunk_is_an_error(tmp_path, zarr_format, shards):
    array = _array(
        tmp_path / "a.zarr", np.float32, zarr_format=zarr_format, shards=shards, compressed=True
    )
    reader = RangeReader(array)
    first = tmp_path / "a.zarr" / "a" / ("0" if zarr_format == 2 else "c/0")
    blob = first.read_bytes()
    if zarr_format == 2:  # blosc would read past the end of a short frame
        first.write_bytes(blob[:20])
        with pytest.raises(ValueError, match="truncated"):
            reader.read(0, CHUNK)
    else:  # the first chunk's header declares 1 decompressed byte
        first.write_bytes(blob[:4] + (1).to_bytes(4, "little") + blob[8:])
        with pytest.raises(ValueError, match="decodes to 1 bytes"):
            reader.read(0, CHUNK)


def test_a_skipped_chunk_head_is_served_from_memory(tmp_path, monkeypatch):
    # Blocks of CSR rows end a few elements into the next chunk; that head must not cost a
    # second decode of the chunk once a read has decoded the chunk for its tail.
    n, chunk = 1000, 100
    values = np.arange(1, n + 1, dtype=np.float32)
    root = zarr.open_group(tmp_path / "h.zarr", mode="w", zarr_format=3)
    from zarr.codecs import BloscCodec

    array = root.create_array(
        "a", shape=(n,), dtype=np.float32, chunks=(chunk,), shards=(500,),
        compressors=[BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")],
    )
    array[:] = values
    reader = RangeReader(zarr.open_group(tmp_path / "h.zarr", mode="r")["a"])
    assert reader.direct
    decoded = []
    decode = reader._decode
    monkeypatch.setattr(reader, "_decode", lambda blob, dest: decoded.append(1) or decode(blob, dest))

    np.testing.assert_array_equal(reader.read(105, 300), values[105:300])
    assert len(decoded) == 2  # chunk 1 for its tail (keeping 100:105), chunk 2 whole
    np.testing.assert_array_equal(reader.read(0, 105), values[:105])
    assert len(decoded) == 3  # chunk 0 only: 100:105 came from memory
    np.testing.assert_array_equal(reader.read(100, 103), values[100:103])
    assert len(decoded) == 3
    np.testing.assert_array_equal(reader.read(100, 140), values[100:140])  # longer than the head
    assert len(decoded) == 4
    # A head longer than an eighth of a chunk is not kept.
    np.testing.assert_array_equal(reader.read(430, 500), values[430:500])
    np.testing.assert_array_equal(reader.read(400, 430), values[400:430])
    assert len(decoded) == 6
