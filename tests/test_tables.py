"""Feature tables: round trips, crash safety, locking, lineage checks, shards."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from featurestore import (AmbiguousTableError, DuplicateRowError, FeatureStoreError, Lineage,
                          LineageMismatchError, Store, TableNotFoundError, WriterLockedError,
                          concat)
from featurestore.formats import FORMATS

REPO = Path(__file__).resolve().parents[1]


def make_lineage(**overrides):
    fields = dict(backbone="densenet121", weights="random:0", pool="max", input_size=32,
                  preprocessing="torch", library_versions={"keras": "3.test"})
    fields.update(overrides)
    return Lineage(**fields)


def make_rows(n, d=16, start=0, seed=0):
    """Rows whose features are a pure function of their index (for crash checks)."""
    idx = np.arange(start, start + n)
    X = np.sin(np.outer(idx + 1.0, np.arange(1, d + 1)) * (0.37 + seed)).astype(np.float32)
    X[:, 0] = idx  # row identity survives any reordering
    return dict(features=X, image_id=[f"{i:064x}" for i in idx],
                aug_id=[int(i % 3) for i in idx], label=[f"c{i % 2}" for i in idx],
                split=["train" if i % 4 else "test" for i in idx],
                path=[f"c{i % 2}/img_{i}.png" for i in idx],
                aug_params=[json.dumps({"angle": float(i)}) if i % 3 else "" for i in idx])


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip_values_dtype_order_metadata(store, fmt):
    lin = make_lineage()
    rows = make_rows(1000)
    with store.writer(lin, formats=(fmt,), rows_per_part=300) as w:
        w.append(**{k: v[:400] if k != "features" else v[:400] for k, v in rows.items()})
        w.append(**{k: v[400:] for k, v in rows.items()})
    reader = store.open(lin, format=fmt)
    X, y, ids, groups = reader.to_numpy()
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X, rows["features"])
    assert list(y) == rows["label"]
    assert list(groups) == rows["image_id"]
    assert list(zip(ids["image_id"], ids["aug_id"])) == list(zip(rows["image_id"],
                                                                  rows["aug_id"]))
    meta = reader.metadata()
    assert meta["path"].tolist() == rows["path"]
    assert meta["aug_params"].tolist() == rows["aug_params"]
    assert meta["aug_id"].tolist() == rows["aug_id"]
    assert reader.lineage == lin and reader.dimension == 16 and len(reader) == 1000


def test_each_file_carries_its_lineage(store):
    lin = make_lineage()
    with store.writer(lin, formats=("hdf5", "parquet"), rows_per_part=50) as w:
        w.append(**make_rows(120))
    table = store.table_dir(lin)
    with h5py.File(table / "hdf5" / "features.h5") as f:
        assert Lineage.from_json(f.attrs["featurestore.lineage"]) == lin
        assert f["features"].chunks[1] == 16 and f["features"].maxshape == (None, 16)
    for part in (table / "parquet").glob("part-*.parquet"):
        meta = pq.read_schema(part).metadata
        assert Lineage.from_json(meta[b"featurestore.lineage"].decode()) == lin


def test_parquet_folder_loads_in_one_pandas_line(store):
    lin = make_lineage()
    rows = make_rows(500)
    with store.writer(lin, formats=("parquet",), rows_per_part=200) as w:
        w.append(**rows)
    df = pd.read_parquet(store.table_dir(lin) / "parquet")
    assert len(df) == 500
    np.testing.assert_array_equal(np.stack(df["features"].to_numpy()), rows["features"])
    assert df["image_id"].tolist() == rows["image_id"]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_filters_batches_and_slices(store, fmt):
    lin = make_lineage()
    rows = make_rows(2000)
    with store.writer(lin, formats=(fmt,), rows_per_part=700) as w:
        w.append(**rows)
    reader = store.open("densenet121/max", format=fmt)
    meta = pd.DataFrame({k: v for k, v in rows.items() if k != "features"})
    want = np.flatnonzero((meta.split == "train") & (meta.label == "c1") & (meta.aug_id == 0))
    X, y, _, groups = reader.to_numpy(split="train", label="c1", aug="raw")
    np.testing.assert_array_equal(X, rows["features"][want])
    assert set(y) == {"c1"}
    aug = reader.to_numpy(aug="augmented")
    assert len(aug.X) == int((meta.aug_id > 0).sum())
    batches = list(reader.iter_batches(batch_size=333, split="test"))
    assert all(len(b[0]) <= 333 for b in batches)
    stacked = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(stacked, rows["features"][meta.split == "test"])
    Xs, ms = reader.read_rows(650, 760)  # crosses a part boundary
    np.testing.assert_array_equal(Xs, rows["features"][650:760])
    assert ms["image_id"].tolist() == rows["image_id"][650:760]
    wide = reader.to_pandas(wide=True, split="train")
    assert list(wide.columns[-2:]) == ["f0014", "f0015"]
    with pytest.raises(FeatureStoreError, match="aug must be"):
        reader.to_numpy(aug="views")


def test_duplicate_keys_are_refused(store):
    lin = make_lineage()
    rows = make_rows(10)
    with store.writer(lin) as w:
        w.append(**rows)
        with pytest.raises(DuplicateRowError, match="already in table"):
            w.append(**make_rows(3, start=8))
    with store.writer(lin) as w:
        assert len(w.existing_keys()) == 10
        with pytest.raises(DuplicateRowError):
            w.append(**make_rows(1, start=0))


def test_second_writer_gets_error_naming_holder(store):
    lin = make_lineage()
    with store.writer(lin) as w:
        w.append(**make_rows(5))
        with pytest.raises(WriterLockedError, match=rf"pid {os.getpid()} on "):
            store.writer(lin).open()
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from featurestore import Store, Lineage
        lin = Lineage.from_json({lin.to_json()!r})
        with Store({str(store.root)!r}).writer(lin):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WriterLockedError, match=rf"pid {proc.pid} "):
            store.writer(lin).open()
    finally:
        proc.kill()
        proc.wait()
    # A killed holder releases the lock: the next writer opens at once.
    with store.writer(lin) as w:
        assert len(w.existing_keys()) == 5


_KILL_WRITER = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
from featurestore import Store, Lineage
from tests.test_tables import make_rows
lin = Lineage.from_json({lineage!r})
store = Store({store!r})
start = int(sys.argv[1])
with store.writer(lin, formats={formats!r}, rows_per_part=37) as w:
    done = w.existing_keys()
    print("open", flush=True)
    for s in range(start, start + 100000, 50):
        rows = make_rows(50, start=s)
        keep = [k not in done for k in zip(rows["image_id"], rows["aug_id"])]
        rows = {{k: (v[keep] if k == "features" else [x for x, c in zip(v, keep) if c])
                 for k, v in rows.items()}}
        w.append(**rows)
"""


@pytest.mark.parametrize("formats", [("hdf5",), ("parquet",), ("hdf5", "parquet")])
def test_kill_9_while_writing_keeps_last_commit(store, formats):
    lin = make_lineage()
    code = _KILL_WRITER.format(repo=str(REPO), lineage=lin.to_json(), store=str(store.root),
                               formats=formats)
    rng = np.random.default_rng(1)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code, "0"], stdout=subprocess.PIPE,
                                text=True, cwd=REPO)
        assert proc.stdout.readline().strip() == "open"
        time.sleep(float(rng.uniform(0.2, 0.8)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for fmt in formats:
            with store.open(lin, format=fmt) as reader:
                X, _, _, groups = reader.to_numpy()
                # No half rows: every row is complete and equals what was written.
                expected = np.stack([make_rows(1, start=int(g, 16))["features"][0]
                                     for g in groups[:: max(1, len(groups) // 50)]])
                np.testing.assert_array_equal(X[:: max(1, len(groups) // 50)], expected)
                assert len(set(groups)) == len(groups)
                assert len(reader) > 0
    # After the kills both formats hold the same rows once the next writer repairs them.
    with store.writer(lin, formats=formats) as w:
        keys = w.existing_keys()
    counts = {fmt: len(store.open(lin, format=fmt)) for fmt in formats}
    assert set(counts.values()) == {len(keys)}


def test_lineage_mismatch_is_refused(store, tmp_path):
    lin_max, lin_avg = make_lineage(), make_lineage(pool="avg")
    assert lin_max.key != lin_avg.key
    with store.writer(lin_max, formats=("hdf5", "parquet")) as w:
        w.append(**make_rows(20))
    with store.writer(lin_avg, formats=("hdf5", "parquet")) as w:
        w.append(**make_rows(20))
    with pytest.raises(LineageMismatchError, match="pool: 'max' vs 'avg'"):
        concat([store.open(lin_max), store.open(lin_avg)])
    both = concat([store.open(lin_max, format="hdf5"), store.open(lin_max, format="parquet")])
    assert len(both.X) == 40
    # A writer pointed at another recipe's folder refuses to write into it.
    from featurestore.writer import TableWriter
    with pytest.raises(LineageMismatchError, match="pool: table has 'max', writer has 'avg'"):
        TableWriter(store.table_dir(lin_max), lin_avg).open()
    # A part file copied in from another table is caught by the reader.
    src = store.table_dir(lin_avg) / "parquet" / "part-000001.parquet"
    (store.table_dir(lin_max) / "parquet" / "part-000009.parquet").write_bytes(src.read_bytes())
    with pytest.raises(LineageMismatchError, match="part-000009.parquet"):
        store.open(lin_max, format="parquet")
    with store.writer(make_lineage(backbone="resnet50")) as w:
        w.append(**make_rows(2, d=16))
        with pytest.raises(LineageMismatchError, match="has 16"):
            w.append(**make_rows(2, d=8, start=5))


def test_queries_unknown_and_ambiguous(store):
    lins = [make_lineage(), make_lineage(pool="avg"), make_lineage(input_size=64)]
    for lin in lins:
        with store.writer(lin) as w:
            w.append(**make_rows(3))
    assert store.resolve("densenet121/avg") == lins[1]
    assert store.resolve("backbone=densenet121,pool=max,input_size=64") == lins[2]
    assert store.resolve(lins[0].key[:-4]) == lins[0]
    assert store.resolve({"pool": "max", "input_size": 32}) == lins[0]
    with pytest.raises(AmbiguousTableError, match=r"2 tables match") as err:
        store.resolve("densenet121/max")
    assert lins[0].key in str(err.value) and lins[2].key in str(err.value)
    with pytest.raises(TableNotFoundError, match="resnet50/max") as err:
        store.open("resnet50/max")
    assert all(lin.key in str(err.value) for lin in lins)
    with pytest.raises(FeatureStoreError, match="Unknown field"):
        store.resolve("colour=red")


def test_shard_writers_side_by_side_then_commit(store):
    lin = make_lineage()
    rows = make_rows(600)
    single = Store(store.root.parent / "single")
    with single.writer(lin, formats=("hdf5", "parquet")) as w:
        w.append(**rows)
    shards = [store.writer(lin, formats=("hdf5", "parquet"), shard=f"{k}/3", rows_per_part=64)
              for k in (1, 2, 3)]
    for w in shards:
        w.open()
    for k, w in enumerate(shards):  # interleaved, as separate processes would
        idx = np.arange(k, 600, 3)
        w.append(**{name: (v[idx] if name == "features" else [v[i] for i in idx])
                    for name, v in rows.items()})
    with pytest.raises(WriterLockedError, match="shard-1-of-3"):
        store.writer(lin, shard="1/3").open()
    for w in shards[:2]:
        w.close()
    assert len(store.open(lin)) == 0  # pending parts are invisible until commit
    summary = store.commit(lin)
    assert summary["merged"] == ["shard-1-of-3", "shard-2-of-3"]
    assert "shard-3-of-3" in summary["skipped"]  # still running
    shards[2].close()
    summary = store.commit(lin)
    assert summary["merged"] == ["shard-3-of-3"] and summary["duplicates"] == 0
    for fmt in ("hdf5", "parquet"):
        merged = store.open(lin, format=fmt).to_pandas()
        ref = single.open(lin, format=fmt).to_pandas()
        merged = merged.sort_values("image_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(merged.drop(columns="features"),
                                      ref.drop(columns="features"))
        np.testing.assert_array_equal(np.stack(merged.features), np.stack(ref.features))
    assert not (store.table_dir(lin) / "pending").exists()
    # A shard rerun over rows already committed adds nothing twice.
    with store.writer(lin, shard="1/3") as w:
        assert len(w.existing_keys()) == 600
    with store.writer(lin, writer_id="late") as w:
        w.append(**make_rows(5, start=600))
    assert store.commit(lin)["rows"] == 5 and len(store.open(lin)) == 605


def test_missing_format_part_is_backfilled(store):
    lin = make_lineage()
    with store.writer(lin, formats=("hdf5", "parquet"), rows_per_part=40,
                      consolidate=False) as w:
        w.append(**make_rows(100))
    # Simulate a kill between the two formats' writes of the last part.
    (store.table_dir(lin) / "hdf5" / "part-000003.h5").unlink()
    assert len(store.open(lin, format="hdf5")) == 80
    with store.writer(lin, formats=("hdf5",)) as w:  # parquet is kept in step too
        w.append(**make_rows(10, start=100))
    for fmt in ("hdf5", "parquet"):
        X, *_ = store.open(lin, format=fmt).to_numpy()
        np.testing.assert_array_equal(X[:, 0], np.arange(110))
    # Adding a format to an existing table backfills all its rows.
    lin2 = make_lineage(pool="avg")
    with store.writer(lin2, formats=("hdf5",)) as w:
        w.append(**make_rows(50))
    with store.writer(lin2, formats=("parquet",)):
        pass
    assert len(store.open(lin2, format="parquet")) == 50


def test_consolidation_leftovers_are_not_read_twice(store):
    lin = make_lineage()
    with store.writer(lin, rows_per_part=10, consolidate=False) as w:
        w.append(**make_rows(30))
    hdf5 = store.table_dir(lin) / "hdf5"
    saved = {p.name: p.read_bytes() for p in hdf5.glob("part-*.h5")}
    with store.writer(lin):
        pass  # consolidates into features.h5 and removes the parts
    assert sorted(p.name for p in hdf5.iterdir()) == ["features.h5"]
    for name, data in saved.items():  # as if killed between the rename and the deletes
        (hdf5 / name).write_bytes(data)
    (hdf5 / ".tmp-dead-features.h5").write_bytes(b"half a file")
    reader = store.open(lin)
    assert len(reader) == 30 and len(set(reader.to_numpy().groups)) == 30
    with store.writer(lin) as w:
        w.append(**make_rows(5, start=30))
    assert sorted(p.name for p in hdf5.iterdir()) == ["features.h5"]
    assert len(store.open(lin)) == 35


def test_hdf5_chunks_fit_small_files_and_reach_full_size_as_the_table_grows(store):
    lin = make_lineage()
    with store.writer(lin, rows_per_part=32, consolidate=False) as w:
        w.append(**make_rows(32, d=1024))
    hdf5 = store.table_dir(lin) / "hdf5"
    [part] = hdf5.glob("part-*.h5")
    assert part.stat().st_size < 200_000  # 128 KB of features; was 4.5 MB (one 4 MiB chunk)
    with store.writer(lin):
        pass  # consolidates the part alone
    assert (hdf5 / "features.h5").stat().st_size < 200_000
    for start, n in ((32, 8), (40, 2000)):  # re-chunked as it grows (rows 0-39 move twice)
        with store.writer(lin, rows_per_part=1000) as w:
            w.append(**make_rows(n, d=1024, start=start))
    with h5py.File(hdf5 / "features.h5") as f:
        assert f["features"].chunks == (1024, 1024)  # ~4 MiB: full reads stay fast
    reader = store.open(lin)
    np.testing.assert_array_equal(reader.to_numpy().X[:, 0], np.arange(2040))
    assert list(reader.metadata()["path"][39:41]) == ["c1/img_39.png", "c0/img_40.png"]
    assert sorted(p.name for p in hdf5.iterdir()) == ["features.h5"]


def test_reader_snapshot_survives_concurrent_consolidation(store):
    lin = make_lineage()
    with store.writer(lin, rows_per_part=10, consolidate=False) as w:
        w.append(**make_rows(30))
    reader = store.open(lin)
    with store.writer(lin) as w:
        w.append(**make_rows(10, start=30))
    assert len(reader) == 30
    np.testing.assert_array_equal(reader.to_numpy().X[:, 0], np.arange(30))
    assert len(store.open(lin)) == 40


def test_store_tables_listing(store):
    lin = make_lineage()
    with store.writer(lin, formats=("hdf5", "parquet")) as w:
        w.append(**make_rows(70))
    [info] = store.tables()
    assert (info.key, info.rows, info.dimension, info.formats) == (lin.key, 70, 16,
                                                                    ("hdf5", "parquet"))
    assert info.size_bytes > 70 * 16 * 4 * 2


def test_lineage_key_changes_with_every_field():
    base = make_lineage()
    variants = [make_lineage(backbone="resnet50"), make_lineage(weights="imagenet"),
                make_lineage(weights_sha256="ab" * 32), make_lineage(pool="avg"),
                make_lineage(input_size=(32, 48)), make_lineage(preprocessing="caffe"),
                make_lineage(augmentation={"preset": "mild", "views": 2, "seed": 0}),
                make_lineage(library_versions={"keras": "3.other"})]
    keys = {base.key} | {v.key for v in variants}
    assert len(keys) == len(variants) + 1
    assert Lineage.from_json(base.to_json()) == base and Lineage.from_json(base.to_json()).key \
        == base.key


def test_kill_9_during_consolidation_loses_nothing(store):
    lin = make_lineage()
    with store.writer(lin, rows_per_part=500, consolidate=False) as w:
        w.append(**make_rows(20000, d=128))
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from featurestore import Store, Lineage
        lin = Lineage.from_json({lin.to_json()!r})
        with Store({str(store.root)!r}).writer(lin):
            print("open", flush=True)
    """)
    rng = np.random.default_rng(2)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(float(rng.uniform(0.0, 0.15)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with store.open(lin) as reader:
            X, _, _, groups = reader.to_numpy()
        assert len(groups) == 20000 and len(set(groups)) == 20000
        np.testing.assert_array_equal(X[:, 0], np.arange(20000))


def test_a_part_is_committed_when_its_oldest_row_has_waited_commit_seconds(store):
    lin = make_lineage()
    with store.writer(lin, rows_per_part=1000, commit_seconds=0.2) as w:
        w.append(**make_rows(3))
        assert w.parts_written == 0  # neither 1000 rows nor 0.2 s yet
        time.sleep(0.25)
        w.append(**make_rows(2, start=3))
        assert (w.parts_written, w.rows_written) == (1, 5)
        assert len(store.open(lin)) == 5  # committed: readable while the writer is open
        w.append(**make_rows(1, start=5))
        assert w.parts_written == 1  # the clock restarted at the commit
