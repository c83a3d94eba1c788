"""predict end to end on a real tiny store: digit images, random-weight DenseNet at 32 px."""

import csv
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from featurestore import Store, TableReader
from pipelines.extract import featurize
from pipelines.cli import main
from pipelines.heads.predict import PredictConfig, run_predict
from tests.test_tables import make_lineage

MODEL = "densenet121/max/logreg"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Digits 3 and 8 (40 images each) extracted at 32 px, and a logreg head fitted on them.

    The recall floor on 8 gives the head a saved threshold far from 0.5, so
    reproducing the held-out labels shows that predict applies it.
    """
    from pipelines.demo.data import write_digits_dataset
    from pipelines.extract.run import ExtractConfig, run_extract
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

    root = tmp_path_factory.mktemp("predict")
    dataset = write_digits_dataset(root / "digits", size=32)
    for folder in dataset.iterdir():
        if folder.name not in ("3", "8"):
            shutil.rmtree(folder)
        else:
            for path in sorted(folder.glob("*.png"))[40:]:
                path.unlink()
    store = root / "store"
    run_extract(ExtractConfig(dataset=dataset, store=store, pool="max", weights="none",
                              image_size=32, workers=1, progress=False))
    fit = run_fit_heads(FitHeadsConfig(store=store, table="densenet121/max", heads=["logreg"],
                                       search="none", cv=3, min_recall=0.95,
                                       positive_class="8"), echo=lambda _: None)
    heldout = pd.read_parquet(fit.heads["logreg"].model_dir / "heldout.parquet")
    images = Store(store).manifest().images().set_index("image_id")
    files = [dataset / images.loc[i, "path"] for i in heldout["image_id"]]
    return SimpleNamespace(root=root, dataset=dataset, store=store, heldout=heldout,
                           files=files, key=fit.table_key, threshold=fit.heads["logreg"].threshold)


def _config(fitted, inputs, out, **kw):
    return PredictConfig(inputs=inputs, store=fitted.store, model=MODEL, out=out,
                         progress=False, batch_size=8, workers=1, **kw)


def _assert_reproduces_heldout(frame, heldout, atol):
    got = frame.set_index("image_id").loc[heldout["image_id"]]
    columns = [c for c in heldout.columns if c.startswith("proba_")]
    assert len(columns) == 2 and [c for c in frame.columns if c.startswith("proba_")] == columns
    np.testing.assert_allclose(got[columns].to_numpy(), heldout[columns].to_numpy(),
                               rtol=0, atol=atol)
    assert list(got["predicted"]) == list(heldout["predicted"])


def _rescan(src, dest, note):
    """Same pixels, other bytes: a new image id whose features equal ``src``'s."""
    info = PngImagePlugin.PngInfo()
    info.add_text("scanner", note)
    Image.open(src).save(dest, pnginfo=info)


def _cached_rows(fitted):
    cache = Store(fitted.store).paths.cache_tables / fitted.key
    if not cache.exists():
        return 0
    with TableReader(cache) as reader:
        return len(reader)


def test_predict_reads_the_models_table_and_reproduces_heldout(fitted, tmp_path):
    out = tmp_path / "pred.parquet"
    cached = _cached_rows(fitted)
    result = CliRunner().invoke(main, ["predict", *map(str, fitted.files), "--store",
                                       str(fitted.store), "--model", MODEL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    n = len(fitted.heldout)
    assert f"Scored {n} of {n} files" in result.output and f"table {n}, cache 0" in result.output
    frame = pd.read_parquet(out)
    assert list(frame["path"]) == [str(p) for p in fitted.files]
    assert (frame["source"] == "table").all() and (frame["error"] == "").all()
    _assert_reproduces_heldout(frame, fitted.heldout, atol=1e-7)
    assert 0.5 < fitted.threshold < 1
    assert list(frame["predicted"]) == list(np.where(frame["proba_8"] >= fitted.threshold,
                                                     "8", "3"))
    assert _cached_rows(fitted) == cached  # nothing had to be extracted


def test_recompute_extracts_fresh_features_that_reproduce_heldout(fitted, tmp_path):
    result = run_predict(_config(fitted, fitted.files, tmp_path / "pred.csv", recompute=True),
                         echo=lambda _: None)
    assert result.exit_code == 0
    assert result.source_counts() == {"table": 0, "cache": 0, "extracted": len(fitted.files)}
    # Same recipe, another batch size and process: equal up to float round-off.
    _assert_reproduces_heldout(result.frame, fitted.heldout, atol=1e-5)
    saved = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert list(saved["image_id"]) == list(result.frame["image_id"])
    cache = Store(fitted.store).paths.cache_tables / fitted.key
    with TableReader(cache) as reader:
        assert set(reader.column("image_id")) >= set(fitted.heldout["image_id"])
    again = run_predict(_config(fitted, fitted.files, tmp_path / "again.csv", recompute=True),
                        echo=lambda _: None)  # cached rows are kept, not duplicated
    assert again.exit_code == 0
    with TableReader(cache) as reader:
        assert len(reader) == len(set(reader.column("image_id")))


def test_new_images_are_extracted_once_and_broken_files_reported(fitted, tmp_path,
                                                                 monkeypatch):
    new = tmp_path / "new"
    (new / "sub").mkdir(parents=True)
    for k, src in enumerate(fitted.files[:4]):
        _rescan(src, new / "sub" / f"scan{k}.png", "gate 4")
    shutil.copy(new / "sub" / "scan0.png", new / "copy-of-scan0.png")  # same bytes
    (new / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "gone.png", new / "gone.png")  # dangling: cannot be read
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(main, ["predict", str(new), str(broken), "--store",
                                       str(fitted.store), "--model", MODEL, "--out", str(out),
                                       "--workers", "1", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 3, result.output  # some files failed, the rest scored
    assert "2 file(s) failed" in result.output and str(broken) in result.output
    assert "gone.png: cannot read" in result.output
    assert "1 file(s) in the folders skipped" in result.output
    frame = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert len(frame) == 7
    failed = frame[frame["error"] != ""]
    assert sorted(failed.index) == sorted([str(broken), str(new / "gone.png")])
    assert (failed["predicted"] == "").all() and (failed["proba_3"] == "").all()
    scored = frame[frame["error"] == ""]
    assert (scored["source"] == "extracted").all() and len(scored) == 5
    assert scored.loc[str(new / "copy-of-scan0.png"), "image_id"] == \
        scored.loc[str(new / "sub" / "scan0.png"), "image_id"]
    # Same pixels as held-out images: the model's recipe gives their held-out scores.
    originals = fitted.heldout.set_index("image_id").loc[
        Store(fitted.store).manifest().images().set_index("path").loc[
            [p.relative_to(fitted.dataset).as_posix() for p in fitted.files[:4]], "image_id"]]
    rescans = scored.loc[[str(new / "sub" / f"scan{k}.png") for k in range(4)]]
    np.testing.assert_allclose(rescans["proba_8"].astype(float), originals["proba_8"],
                               atol=1e-5)

    def no_extraction(*args, **kwargs):
        raise AssertionError("cached images were extracted again")

    monkeypatch.setattr(featurize, "iter_feature_batches", no_extraction)
    second = run_predict(_config(fitted, [new, broken], tmp_path / "second.csv"),
                         echo=lambda _: None)
    assert second.source_counts() == {"table": 0, "cache": 5, "extracted": 0}
    # Broken files fail again, from their header alone: no backbone is started for them.
    assert second.exit_code == 3 and len(second.errors) == 2


def test_a_run_killed_midway_keeps_committed_batches(fitted, tmp_path, monkeypatch):
    new = tmp_path / "new"
    new.mkdir()
    for k, src in enumerate(fitted.files[:6]):
        _rescan(src, new / f"scan{k}.png", "gate 9")
    original = featurize.iter_feature_batches

    def killed_after_one_batch(*args, **kwargs):
        for batch in original(*args, **kwargs):
            yield batch
            raise KeyboardInterrupt

    monkeypatch.setattr(featurize, "iter_feature_batches", killed_after_one_batch)
    config = PredictConfig(inputs=[new], store=fitted.store, model=MODEL,
                           out=tmp_path / "pred.csv", batch_size=2, workers=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_predict(config, echo=lambda _: None)
    assert not (tmp_path / "pred.csv").exists()
    monkeypatch.setattr(featurize, "iter_feature_batches", original)
    rerun = run_predict(config, echo=lambda _: None)
    assert rerun.source_counts() == {"table": 0, "cache": 2, "extracted": 4}


def test_weights_that_differ_from_the_lineage_are_refused(fitted, tmp_path):
    image = fitted.files[0]
    wrong = tmp_path / "other.weights.h5"
    wrong.write_bytes(b"not the weights the model's features came from")
    out = tmp_path / "pred.csv"
    args = ["predict", str(image), "--store", str(fitted.store), "--model", MODEL,
            "--out", str(out), "--weights", str(wrong)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "randomly initialised" in result.output and "Leave --weights out" in result.output
    assert "Traceback" not in result.output and not out.exists()

    # A model fitted on features of a weights file: the file at hand must have its hash.
    store = tmp_path / "store"
    lineage = make_lineage(weights="file:scanner.weights.h5", weights_sha256="ab" * 32)
    _fit_on_random_features(store, lineage)
    outputs = []
    for extra in (["--weights", str(wrong)], []):
        result = CliRunner().invoke(main, ["predict", str(image), "--store", str(store),
                                           "--model", "logreg", "--out", str(out), *extra])
        assert result.exit_code == 2, result.output
        assert f"Refusing to score with model {lineage.key}/logreg" in result.output
        assert "ab" * 32 in result.output and "Traceback" not in result.output
        assert not out.exists() and not Store(store).paths.cache.exists()
        outputs.append(result.output)
    assert "have SHA-256" in outputs[0] and str(wrong) in outputs[0]  # both hashes named
    assert "pass that file" in outputs[1]  # no --weights: says which file is needed


#: Class names a hostile colleague might give folders: formulas when a spreadsheet opens them.
FORMULA_NAMES = {"3": "=cmd|' -C calc'!A0", "8": "@SUM(1+1)"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_csv_output_cells_cannot_start_a_formula_and_parquet_keeps_them(fitted, tmp_path,
                                                                        monkeypatch):
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

    store = tmp_path / "store"  # the fitted table with its classes renamed
    with Store(fitted.store).open(fitted.key) as reader:
        meta, X, lineage = reader.metadata(), reader.read_features(), reader.lineage
    with Store(store).writer(lineage) as writer:
        writer.append(X, image_id=meta["image_id"], aug_id=meta["aug_id"],
                      label=meta["label"].map(FORMULA_NAMES), split=meta["split"],
                      path=meta["path"])
    run_fit_heads(FitHeadsConfig(store=store, table=lineage.key, heads=["logreg"],
                                 search="none", cv=3), echo=lambda _: None)
    monkeypatch.chdir(tmp_path)
    shutil.copy(fitted.files[0], "+HYPERLINK(1).png")  # a path cell starting with +
    inputs = ["+HYPERLINK(1).png", *map(str, fitted.files[1:6])]
    for out in ("pred.csv", "pred.parquet"):
        result = CliRunner().invoke(main, ["predict", *inputs, "--store", str(store),
                                           "--model", MODEL, "--out", out])
        assert result.exit_code == 0, result.output
    with open("pred.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert not [c for row in rows for c in row if c.startswith(FORMULA_STARTS)]
    raw = pd.read_parquet("pred.parquet")  # the real values
    assert raw["path"][0] == "+HYPERLINK(1).png" and rows[1][0] == "'+HYPERLINK(1).png"
    assert set(raw["predicted"]) <= set(FORMULA_NAMES.values())
    assert [r[-2] for r in rows[1:]] == ["'" + label for label in raw["predicted"]]
    assert {f"proba_{name}" for name in FORMULA_NAMES.values()} <= set(raw.columns)


def test_out_in_a_missing_folder_is_refused_and_stale_tmp_outputs_are_cleaned(fitted,
                                                                              tmp_path):
    args = ["predict", str(fitted.files[0]), "--store", str(fitted.store), "--model", MODEL]
    out = tmp_path / "missing" / "dir" / "x.csv"
    result = CliRunner().invoke(main, args + ["--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: out folder {out.parent} does not exist; create it first or choose another "
        f"--out."]
    assert not (tmp_path / "missing").exists()
    stale = tmp_path / ".tmp-0123abcd-x.csv"  # left by a run killed while writing x.csv
    stale.write_text("half")
    mine = tmp_path / ".tmp-notes.txt"  # a user's own file: not ours to delete
    mine.write_text("keep")
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and mine.read_text() == "keep"


def _fit_on_random_features(store, lineage):
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

    rng = np.random.default_rng(0)
    n = 40
    labels = np.array(["a", "b"] * (n // 2))
    X = rng.normal(size=(n, 8)).astype(np.float32) + (labels == "b")[:, None]
    with Store(store).writer(lineage) as writer:
        writer.append(X, image_id=[f"{i:064x}" for i in range(n)], label=labels,
                      split=["train"] * 30 + ["test"] * 10)
    run_fit_heads(FitHeadsConfig(store=store, table=lineage.key, heads=["logreg"],
                                 search="none", cv=3), echo=lambda _: None)


def test_bad_model_names_and_outputs_are_refused_with_the_known_models(fitted, tmp_path):
    base = ["predict", str(fitted.files[0]), "--store", str(fitted.store)]
    result = CliRunner().invoke(main, base + ["--model", "svm"])
    assert result.exit_code == 2
    assert "No model named 'svm'" in result.output and f"{fitted.key}/logreg" in result.output
    result = CliRunner().invoke(main, base + ["--model", MODEL, "--out",
                                              str(tmp_path / "p.xlsx")])
    assert result.exit_code == 2 and "out must end in .csv or .parquet" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["predict", str(empty), "--store", str(fitted.store),
                                       "--model", MODEL])
    assert result.exit_code == 2 and "No image files" in result.output


def test_a_non_utf8_file_name_keeps_its_row_with_an_escaped_path(fitted, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"scan\xff.png")  # not UTF-8: a bytes name
    _rescan(fitted.files[0], os.fsdecode(odd), "odd name")  # new bytes: extracted and cached
    shutil.copyfile(fitted.files[1], folder / "plain.png")
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(main, ["predict", str(folder), "--store", str(fitted.store),
                                       "--model", MODEL, "--out", str(out), "--workers", "1",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Scored 2 of 2 files" in result.output
    assert "1 path(s) are not valid UTF-8; written with \\x escapes" in result.output
    saved = pd.read_csv(out, keep_default_na=False)
    escaped = str(folder / "scan\\xff.png")
    assert list(saved["path"]) == [str(folder / "plain.png"), escaped]
    assert (saved["error"] == "").all() and (saved["source"] == ["table", "extracted"]).all()
    with TableReader(Store(fitted.store).paths.cache_tables / fitted.key) as reader:
        assert escaped in set(reader.column("path"))  # the cache holds the same text
