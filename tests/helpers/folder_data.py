"""A folder data set (``data=folder``) made from the embedded scenes: images, label PNGs and classes.yaml."""

import numpy as np
import yaml
from PIL import Image

from dgss.data.synthetic import render_sample

# the embedded scenes' road / sky / car as label values 7 / 23 / 26 (Cityscapes labelIds), everything else 0
RAW = {0: 7, 10: 23, 13: 26}
CLASSES = {"names": ["road", "sky", "car"], "colors": [[128, 64, 128], [70, 130, 180], [0, 0, 142]],
           "ignore_index": 0, "id_to_train": {7: 0, 23: 1, 26: 2}}  # fmt: skip


def make_folder(root, n_train=6, n_val=2, classes=CLASSES):
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image, label = render_sample("game" if split == "train" else "fog", i, 64, 128, 0)
            raw = np.zeros_like(label)
            for train_id, value in RAW.items():
                raw[label == train_id] = value
            sub = f"seq{i % 2}"  # nested folders are kept
            for kind, arr, ext in (("images", np.asarray(image), ".jpg"), ("labels", raw, ".png")):
                (root / kind / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / kind / split / sub / f"frame{i:03d}{ext}")
    return root
