"""Read back what a W&B run wrote offline (``run-<id>.wandb``): its history rows, for tests.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version) then LevelDB-log-format blocks of
32 KiB, each record ``crc32 (4) | length (2, little endian) | type (1) | data``, types 1 full, 2 first,
3 middle, 4 last; the data are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32 * 1024, 7


def records(path: Path) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file, fragments joined."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunk = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < HEADER or (kind == 0 and length == 0):  # block trailer or zero padding
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield payload
        elif kind == 2:
            chunk = payload
        elif kind == 3:
            chunk += payload
        elif kind == 4:
            yield chunk + payload


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows (``_step`` and every key) of a W&B run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows
