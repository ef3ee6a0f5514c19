"""Read the records of an offline W&B run file (.wandb: a LevelDB-style log of protobuf records).

wandb >= 0.2x writes it from its Go core and ships no Python reader, so tests read it here.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks, buf = HEADER, [], b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            chunks.append(buf)
            buf = b""
    records = []
    for data in chunks:
        record = pb.Record()
        record.ParseFromString(data)
        records.append(record)
    return records
