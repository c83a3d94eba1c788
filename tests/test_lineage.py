"""Lineage keys stay what they were, and stores written before precision/runtime were fields open."""

import json

import h5py
import numpy as np
import pytest

from featurestore import FeatureStoreError, Lineage, Store
from featurestore.formats.base import LINEAGE_ATTR

VERSIONS = {"backend": "tensorflow", "keras": "3.11.3", "numpy": "2.1.3", "pillow": "11.3.0",
            "tensorflow": "2.20.0"}
BASE = dict(backbone="densenet121", weights="random:0", pool="max", input_size=(224, 224),
            preprocessing="torch")

# Keys computed by the code of commit 765324c (before precision and runtime were fields).
KEYS_BEFORE = [
    (dict(BASE, library_versions=VERSIONS), "densenet121-max-224-197e01946d49"),
    (dict(BASE, pool="avg", library_versions=dict(VERSIONS, compute_dtype="bfloat16")),
     "densenet121-avg-224-b5bc8f0236b7"),
    (dict(BASE, weights="imagenet", weights_sha256="ab" * 32,
          augmentation={"preset": "mild", "views": 4, "seed": 0, "splits": ["train"]},
          library_versions=dict(VERSIONS, scipy="1.16.2")),
     "densenet121-max-224-13a768a7c598"),
    (dict(BASE, input_size=32), "densenet121-max-32-aabb89637db9"),
]


@pytest.mark.parametrize("fields, key", KEYS_BEFORE, ids=["float32", "bfloat16", "augmented",
                                                          "bare"])
def test_keys_of_todays_defaults_are_unchanged(fields, key):
    lin = Lineage(**fields)
    assert lin.key == key
    assert Lineage.from_json(lin.to_json()).key == key
    assert Lineage.from_dict(lin.to_dict()).key == key


def test_precision_changes_the_key_when_not_default_and_runtime_never_does():
    lin = Lineage(**BASE, library_versions=VERSIONS)
    assert (lin.precision, lin.runtime) == ("float32", "keras")
    openvino = Lineage(**BASE, library_versions=VERSIONS, runtime="openvino")
    # The runtimes agree within 1e-5 (tests/test_runtimes.py): one table, either runtime.
    assert openvino.key == lin.key == KEYS_BEFORE[0][1] and openvino == lin
    assert openvino.to_dict()["runtime"] == "openvino" and openvino.diff(lin) == {}
    assert Lineage(**BASE, library_versions=VERSIONS, precision="bfloat16").key != lin.key
    assert "precision" not in lin.to_json() and "runtime" not in openvino.to_json()
    assert lin.to_dict()["precision"] == "float32" and lin.to_dict()["runtime"] == "keras"


def test_bfloat16_recorded_in_library_versions_is_the_precision():
    old = Lineage(**BASE, library_versions=dict(VERSIONS, compute_dtype="bfloat16"))
    assert old.precision == "bfloat16"
    new = Lineage(**BASE, library_versions=dict(VERSIONS, compute_dtype="bfloat16"),
                  precision="bfloat16")
    assert new == old and new.key == old.key
    with pytest.raises(FeatureStoreError, match="precision"):
        Lineage(**BASE, library_versions={"compute_dtype": "bfloat16"}, precision="float16")


def test_name_is_short_and_a_query_of_its_table():
    raw = Lineage(**BASE)
    mild = Lineage(**dict(BASE, augmentation={"preset": "mild", "views": 2, "seed": 0,
                                               "splits": ["train"]}))
    bf16 = Lineage(**BASE, precision="bfloat16")
    assert (raw.name, mild.name, bf16.name) == (
        "densenet121/max/224", "densenet121/max/224+mild", "densenet121/max/224@bfloat16")
    assert Lineage(**dict(BASE, input_size=(224, 256))).name == "densenet121/max/224x256"


# lineage.json and a part's lineage attribute exactly as commit 765324c wrote them.
OLD_LINEAGE_JSON = """{
  "augmentation": null,
  "backbone": "densenet121",
  "input_size": [
    32,
    32
  ],
  "library_versions": {
    "backend": "tensorflow",
    "compute_dtype": "bfloat16",
    "keras": "3.11.3"
  },
  "pool": "avg",
  "preprocessing": "torch",
  "weights": "random:0",
  "weights_sha256": null
}"""
OLD_PART_JSON = ('{"augmentation":null,"backbone":"densenet121","input_size":[32,32],'
                 '"library_versions":{"backend":"tensorflow","compute_dtype":"bfloat16",'
                 '"keras":"3.11.3"},"pool":"avg","preprocessing":"torch","weights":"random:0",'
                 '"weights_sha256":null}')
OLD_KEY = "densenet121-avg-32-414e9f95763f"


def test_store_written_before_the_new_fields_still_opens(tmp_path):
    store = Store(tmp_path / "store")
    lin = Lineage.from_json(OLD_LINEAGE_JSON)
    assert lin.key == OLD_KEY
    with store.writer(lin, formats=("hdf5",)) as writer:
        writer.append(np.ones((3, 4), np.float32), image_id=[f"{i:064x}" for i in range(3)])
    table = store.table_dir(lin)
    (table / "lineage.json").write_text(OLD_LINEAGE_JSON)
    for part in (table / "hdf5").glob("*.h5"):
        with h5py.File(part, "r+") as f:
            f.attrs[LINEAGE_ATTR] = OLD_PART_JSON
    found = Store(store.root, create=False).resolve("densenet121/avg/32@bfloat16")
    assert (found.key, found.precision, found.runtime) == (OLD_KEY, "bfloat16", "keras")
    with store.open(OLD_KEY) as reader:
        assert len(reader) == 3 and reader.lineage.precision == "bfloat16"
    assert json.loads((table / "lineage.json").read_text()) == json.loads(OLD_LINEAGE_JSON)
