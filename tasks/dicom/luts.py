"""Reading one LUT item: a Modality LUT Sequence or VOI LUT Sequence item (PS3.3 C.11.1, C.11.2).

:func:`read_lut` returns the first mapped value, the LUT data as integers and the bits per entry,
or raises ``InputError`` naming the tag and the rule broken. The pixel path applies the result
and the content fingerprint hashes it, so both read a LUT the same way whatever the VR it was
written with (OW bytes or US values; an implicit VR copy reads the same numbers).

Rules: (0028,3002) LUT Descriptor has 3 values: number of entries (0 means 65,536), first stored
value mapped (read as signed when the pixels are and it was stored as US), and bits per entry,
which the standard says is between 8 and 16; anything outside (0, a negative count read as SS,
more than 16) is refused here instead of becoming a division by zero or a negative shift later.
(0028,3006) LUT Data must hold at least the declared number of entries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import label
from tasks.dicom.values import shown

MIN_BITS, MAX_BITS = 8, 16


def _values(value: Any) -> list[Any]:
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def read_lut(item: Dataset, where: str) -> tuple[int, np.ndarray, int]:
    """(first mapped value, LUT data as int64, output bits) of a LUT item; ``where`` names the
    sequence (its label) for messages."""
    descriptor = label("LUTDescriptor")
    desc = item.get("LUTDescriptor")
    if desc is None:
        raise InputError(f"{where} item 1 {descriptor} is missing")
    values = _values(desc)
    if len(values) != 3:
        raise InputError(f"{where} item 1 {descriptor} has {len(values)} values; it must have 3")
    try:
        entries, first, bits = (int(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(
            f"{where} item 1 {descriptor} value {shown(desc)} is not three integers"
        ) from None
    if entries < 0:
        raise InputError(
            f"{where} item 1 {descriptor} declares {entries} entries; the count must be "
            "0 (65,536) or more"
        )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(
            f"{where} item 1 {descriptor} declares {bits} bits per entry; it must be between "
            f"{MIN_BITS} and {MAX_BITS}"
        )
    entries = entries or 65536
    if item["LUTDescriptor"].VR == "US" and first >= 1 << 15:
        first -= 1 << 16  # descriptor stored as US although the input is signed
    if "LUTData" not in item:
        raise InputError(f"{where} item 1 {label('LUTData')} is missing")
    raw = item.LUTData
    try:
        if isinstance(raw, bytes | bytearray):
            wide = bits > 8 or item["LUTData"].VR == "OW"
            data = np.frombuffer(raw, dtype="<u2" if wide else "u1").astype(np.int64)
        elif isinstance(raw, int):
            data = np.asarray([raw], dtype=np.int64)
        elif raw is None:
            data = np.zeros(0, dtype=np.int64)
        else:  # a MultiValue of US values
            data = np.fromiter((int(v) for v in raw), dtype=np.int64, count=len(raw))
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            f"{where} item 1 {label('LUTData')} cannot be read as {bits}-bit entries"
        ) from None
    if len(data) < entries:
        raise InputError(
            f"{where} item 1 {label('LUTData')} has {len(data)} entries, fewer than the "
            f"{entries} declared in {descriptor}"
        )
    return first, data[:entries], bits
