"""Carry the shared data and the packaged model to a lent GPU machine, whose copy of the repo has
no ``../shared`` and no room for a 91 MB FP32 checkpoint (the working tree travels under 64 MiB).

    python benchmarks/gpu_carry.py pack   DIR   # here: DIR/data.tar.xz + DIR/minilm (weights as FP16)
    python benchmarks/gpu_carry.py unpack DIR DEST  # there: DEST/data (SPARSEBERT_DATA_DIR), DEST/minilm (FP32)

The FP16 round trip changes each pre-trained weight by at most 2^-11 of its value (relative); every
GPU run starts from the same rounded weights, so their comparisons are unaffected.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

DATA = ["glue/SST-2", "glue/STS-B", "squad/dev-v1.1.json", "wikipedia-sample/text", "wikitext-2/valid.txt"]
MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


def pack(dest: Path) -> None:
    """Write the data tarball and an FP16 copy of the packaged model into ``dest``."""
    from safetensors.torch import load_file, save_file

    from sparsebert.models import default_model_path
    from sparsebert.tasks.base import default_shared_data_dir

    shared = default_shared_data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "data.tar.xz", "w:xz") as tar:
        for rel in DATA:
            tar.add(shared / rel, arcname=f"data/{rel}")
    src = Path(default_model_path())
    (dest / "minilm").mkdir(exist_ok=True)
    for f in MODEL_FILES:
        shutil.copy(src / f, dest / "minilm" / f)
    weights = {k: v.half() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, dest / "minilm" / "model.fp16.safetensors")


def unpack(src: Path, dest: Path) -> None:
    """Untar the data into ``dest/data`` and write ``dest/minilm`` with FP32 weights."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "data.tar.xz") as tar:
        tar.extractall(dest, filter="data")
    (dest / "minilm").mkdir(exist_ok=True)
    for f in MODEL_FILES:
        shutil.copy(src / "minilm" / f, dest / "minilm" / f)
    weights = {k: v.float() for k, v in load_file(src / "minilm" / "model.fp16.safetensors").items()}
    save_file(weights, dest / "minilm" / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    if sys.argv[1:2] == ["pack"]:
        pack(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["unpack"]:
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
