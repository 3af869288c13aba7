"""Label-id → trainId maps of the real DGSS data sets (the data sets' own label definitions, as mmseg's and Rein's converters use them); every id not listed → 255.

Each map is a 256-entry (or 65536 for Synthia) lookup table, so converting a label image is one indexing op.
"""

from __future__ import annotations

import numpy as np

from dgss.data.classes import IGNORE_INDEX

# Cityscapes labelId -> trainId; GTAV labels are Cityscapes labelIds
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                          26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
# Synthia RAND-CITYSCAPES class id (first channel of its 16-bit label PNG) -> trainId (DAFormer-lineage converter)
SYNTHIA_ID_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                       18: 14, 19: 15, 20: 16, 12: 17, 11: 18}  # fmt: skip
# Mapillary Vistas v1.2 label id (0..65) -> trainId, by the official name rules
MAPILLARY_V12_TO_TRAIN = (
    [
        255,
        255,
        1,
        4,
        255,
        255,
        3,
        0,
        0,
        1,
        0,
        1,
        255,
        0,
        0,
        1,
        255,
        2,
        255,
        11,
        12,
        12,
        12,
        0,
        0,
        255,
        255,
        10,
        255,
        9,
        8,
    ]
    + [255] * 13  # ids 31-43
    + [5, 5, 7, 5, 6, 7, 7, 255, 18, 255, 15, 13, 255, 17, 16, 255, 255, 14, 255, 255, 255, 255]
)


def lookup_table(mapping: dict[int, int] | list[int], size: int = 256) -> np.ndarray:
    """uint8 table of ``size`` entries: table[id] = trainId, 255 elsewhere."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    items = mapping.items() if isinstance(mapping, dict) else enumerate(mapping)
    for k, v in items:
        table[k] = v
    return table


def to_train_ids(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map an integer label image through a lookup table (ids past the table → 255)."""
    label = np.asarray(label)
    out = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
    inside = label < len(table)
    out[inside] = table[label[inside]]
    return out
