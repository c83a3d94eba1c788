"""ingest end to end on a real tiny store: new digit scans enter every table, index and score."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from featurestore import Store, TableReader
from featurestore.index import SimilarityIndex
from featurestore.splits import INBOX
from pipelines.cli import main
from pipelines.ingest.run import IngestConfig, run_ingest
from tests.ingest_store import MODEL, TABLE, living_store  # noqa: F401 (a fixture)

QUIET = dict(echo=lambda _: None)


@pytest.fixture(scope="module")
def living(living_store):  # noqa: F811 (the imported fixture)
    return SimpleNamespace(**{**vars(living_store), "scans": living_store.scans[:8]})


def _rows(living):
    with Store(living.store).open(TABLE) as reader:
        return reader.metadata()


def test_new_scans_reach_table_index_and_scores_and_a_rerun_is_a_noop(living, tmp_path):
    from pipelines.heads.predict import PredictConfig, run_predict

    before = len(_rows(living))
    first = run_ingest(IngestConfig(paths=living.scans[:3], store=living.store), **QUIET)
    assert [o.new for o in first.outcomes] == [True] * 3 and first.exit_code == 0
    rows = _rows(living)
    ids = [o.image_id for o in first.outcomes]
    added = rows.iloc[before:]
    assert list(added["image_id"]) == ids and set(added["split"]) == {INBOX}
    assert set(added["label"]) == {""}
    with Store(living.store).open(TABLE) as reader:  # the index learnt the rows: not stale
        assert SimilarityIndex.load(reader).rows == before + 3
    scores = Store(living.store).scores(model=f"{living.key}/logreg").set_index("image_id")
    predicted = run_predict(PredictConfig(inputs=living.scans[:3], store=living.store,
                                          model=MODEL, out=tmp_path / "p.csv", progress=False),
                            **QUIET).frame.set_index("image_id")
    columns = ["proba_3", "proba_8"]
    np.testing.assert_array_equal(scores.loc[ids, columns], predicted.loc[ids, columns])
    assert list(scores.loc[ids, "predicted"]) == list(predicted.loc[ids, "predicted"])
    inbox = Store(living.store).manifest().ingested(ids)
    assert set(inbox["split"]) == {INBOX} and (living.store / "ingested").is_dir()

    again = run_ingest(IngestConfig(paths=living.scans[:4], store=living.store), **QUIET)
    assert [o.new for o in again.outcomes] == [False, False, False, True]
    assert "3 already in the store (nothing to do)" in again.summary()
    assert len(_rows(living)) == before + 4
    scores = Store(living.store).scores()
    assert len(scores[scores["image_id"].isin(ids + [again.outcomes[3].image_id])]) == 4


def test_cli_labelled_ingest_scores_listing_and_bad_input(living):
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(living.scans[4]), "--store", str(living.store),
                                  "--label", "8", "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "1 new" in result.output
    row = _rows(living).iloc[-1]
    assert (row["label"], row["split"]) == ("8", "val")
    listing = runner.invoke(main, ["scores", "--store", str(living.store)])
    assert listing.exit_code == 0 and "logreg" in listing.output
    bad = runner.invoke(main, ["ingest", str(living.scans[5]), "--store", str(living.store),
                               "--split", "test"])
    assert bad.exit_code == 2 and bad.output.startswith("Error: split 'test' needs a label")
    assert len(bad.output.strip().splitlines()) == 1
    text = living.root / "notes.png"
    text.write_text("not an image")
    failed = runner.invoke(main, ["ingest", str(text), "--store", str(living.store)])
    assert failed.exit_code == 2 and "not an image" in failed.output


def test_inbox_rows_never_train_evaluate_or_audit(living):
    from pipelines.audit.run import AuditLabelsConfig, run_audit_labels
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads
    from pipelines.similar.evaluate import EvalSearchConfig, run_eval_search

    run_ingest(IngestConfig(paths=living.scans[5:7], store=living.store), **QUIET)
    rows = _rows(living)
    inbox = set(rows.loc[rows["split"] == INBOX, "image_id"])
    assert len(inbox) >= 2
    fit = run_fit_heads(FitHeadsConfig(store=living.store, table=TABLE, heads=["logreg"],
                                       search="none", cv=3), **QUIET)
    folder = fit.heads["logreg"].model_dir
    for name in ("oof.parquet", "heldout.parquet"):
        assert inbox.isdisjoint(pd.read_parquet(folder / name)["image_id"]), name
    audit = run_audit_labels(AuditLabelsConfig(store=living.store, table=TABLE, neighbours=0), **QUIET)
    assert inbox.isdisjoint(audit.ranking["image_id"])
    search = run_eval_search(EvalSearchConfig(store=living.store, ks=(5,)))
    assert set(search["label"]) == {"3", "8", "all"}
    assert search["n_queries"].max() == len(rows) - len(inbox)


def test_a_labelled_ingest_of_inbox_bytes_makes_them_training_data_for_the_next_fit(living):
    scan = living.scans[7]
    first = run_ingest(IngestConfig(paths=[scan], store=living.store), **QUIET).outcomes[0]
    written = _rows(living).set_index("image_id").loc[first.image_id]
    labelled = run_ingest(IngestConfig(paths=[scan], store=living.store, label="3"), **QUIET)
    assert labelled.outcomes[0].labelled and not labelled.outcomes[0].new
    assert "1 labelled" in labelled.summary()
    store = Store(living.store)
    assert store.manifest().ingested([first.image_id]).iloc[0][["label", "split"]].tolist() \
        == ["3", "train"]
    with TableReader(store.table_dir(store.resolve(TABLE))) as raw:  # the rows as written
        assert raw.metadata().set_index("image_id").loc[first.image_id, "split"] == INBOX
    with store.open(TABLE) as reader:  # what fit-heads reads: the label overlaid
        train = reader.to_numpy(split="train")
    ids = list(train.ids["image_id"])
    assert first.image_id in ids and train.y[ids.index(first.image_id)] == "3"
    assert written["split"] == INBOX
    again = run_ingest(IngestConfig(paths=[scan], store=living.store, label="8"), **QUIET)
    assert again.exit_code == 2 and "through a view" in again.outcomes[0].error


def test_a_decisions_file_labels_inbox_images_all_or_nothing(living):
    from featurestore._io import hash_file

    runner, store = CliRunner(), Store(living.store)
    scans = living.scans[5:7]  # in the inbox (test_inbox_rows_... ingests them first)
    run_ingest(IngestConfig(paths=scans, store=living.store), **QUIET)
    ids = [hash_file(p) for p in scans]
    good = living.root / "decisions.csv"

    def refused(rows, reason):
        pd.DataFrame(rows).to_csv(good, index=False)
        result = runner.invoke(main, ["label", str(good), "--store", str(living.store)])
        assert result.exit_code == 2 and reason in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert set(store.manifest().ingested(ids)["split"]) == {INBOX}  # nothing half-applied

    first = {"image_id": ids[0], "label": "3", "split": "val"}
    refused([first, {"image_id": "f" * 64, "label": "8"}], "row 3: not in the store")
    refused([first, {"image_id": ids[1], "label": "9"}], "row 3: unknown class '9'")
    refused([first, {"image_id": ids[0], "label": "8"}], "row 3: image")
    refused([first, {"path": "gone.png", "label": "8"}], "row 3: no image_id, and no file")
    # An id or a path on each row: the path's bytes give the id where image_id is empty.
    pd.DataFrame([first, {"path": str(scans[1].resolve()), "label": "8"}]).to_csv(
        good, index=False)
    result = runner.invoke(main, ["label", str(good), "--store", str(living.store)])
    assert result.exit_code == 0 and "2 inbox image(s) labelled" in result.output, result.output
    labelled = store.manifest().ingested(ids).set_index("image_id")
    assert labelled.loc[ids, ["label", "split"]].values.tolist() == [["3", "val"], ["8", "train"]]
    with store.open(TABLE) as reader:  # what the next fit reads: the labels overlaid
        rows = reader.metadata().set_index("image_id")
    assert rows.loc[ids, "label"].tolist() == ["3", "8"]
    again = runner.invoke(main, ["label", str(good), "--store", str(living.store)])
    assert again.exit_code == 0 and "2 had that label already" in again.output
