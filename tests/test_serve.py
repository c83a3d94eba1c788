"""featurestore serve over real HTTP: uvicorn started on 127.0.0.1 by the test, an httpx client."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurestore import Store
from featurestore.index import SimilarityIndex
from pipelines.cli import main
from pipelines.serve.uploads import PARTIAL_PREFIX
from tests.image_zoo import png_header_only
from tests.ingest_store import MODEL, TABLE, living_store  # noqa: F401 (a fixture)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT_MB = 0.25
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(store, *, token=TOKEN):
    """``featurestore serve`` in its own process; yields (base URL, process); always stopped."""
    port = _free_port()
    cmd = [sys.executable, "-m", "featurestore", "serve", "--store", str(store), "--port",
           str(port), "--max-upload-mb", str(LIMIT_MB)] + (["--token", token] if token else [])
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def living(living_store):  # noqa: F811 (the imported fixture)
    living = SimpleNamespace(**{**vars(living_store), "scans": living_store.scans[8:]})
    with server(living.store) as (base, proc):
        living.base, living.proc = base, proc
        yield living


def _upload(living, path, headers=AUTH, **form):
    with open(path, "rb") as f:
        return httpx.post(f"{living.base}/v1/images", files={"file": ("../../evil.png", f)},
                          data=form, headers=headers, timeout=120)


def _state(living):
    """What a refused request must leave untouched: table rows, ingested rows and files."""
    store = Store(living.store)
    with store.open(TABLE) as reader:
        rows = len(reader)
    return rows, len(store.manifest().ingested()), sorted(os.listdir(store.paths.ingested)) \
        if store.paths.ingested.exists() else []


def test_upload_scores_like_predict_neighbours_like_search_and_reupload_is_a_noop(living,
                                                                                 tmp_path):
    from pipelines.heads.predict import PredictConfig, run_predict
    from pipelines.similar.search import SearchConfig, run_search

    answer = _upload(living, living.scans[0])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["new"] is True
    image_id = body["image_id"]
    predicted = run_predict(PredictConfig(inputs=[living.scans[0]], store=living.store,
                                          model=MODEL, out=tmp_path / "p.csv", progress=False),
                            echo=lambda _: None).frame.iloc[0]
    score = body["scores"][f"{living.key}/logreg"]
    assert score["proba"] == {"3": predicted["proba_3"], "8": predicted["proba_8"]}
    assert score["predicted"] == predicted["predicted"]
    searched = run_search(SearchConfig(store=living.store, table=living.key, query=image_id,
                                       k=3))
    similar = httpx.get(f"{living.base}/v1/images/{image_id}/similar",
                        params={"table": TABLE, "k": 3}).json()
    assert [n["image_id"] for n in similar] == list(searched["image_id"])
    # The server's query is the index's own normalised row: equal to float32 rounding.
    np.testing.assert_allclose([n["similarity"] for n in similar], 1 - searched["distance"],
                               rtol=1e-6)
    assert [n["image_id"] for n in body["neighbours"][living.key][:3]] == \
        list(searched["image_id"])
    record = httpx.get(f"{living.base}/v1/images/{image_id}").json()
    assert record["manifest"]["split"] == "inbox" and record["manifest"]["name"] == \
        "../../evil.png"  # shown, never used as a path
    assert not (living.root / "evil.png").exists()
    thumb = httpx.get(f"{living.base}{similar[0]['thumbnail']}")
    assert thumb.headers["content-type"] == "image/png" and thumb.content[:4] == b"\x89PNG"
    assert [t["key"] for t in httpx.get(f"{living.base}/v1/tables").json()] == [living.key]
    assert httpx.get(f"{living.base}/v1/models").json()[0]["name"] == f"{living.key}/logreg"
    before = _state(living)
    again = _upload(living, living.scans[0]).json()
    assert again["new"] is False and again["image_id"] == image_id and _state(living) == before


def _chunked_multipart(payload: bytes, boundary: str = "bnd"):
    """A multipart body sent in chunks without Content-Length (so only streaming can stop it)."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"big.png\"\r\n\r\n").encode()
    for start in range(0, len(payload), 65536):
        yield payload[start: start + 65536]
    yield f"\r\n--{boundary}--\r\n".encode()


def test_rejections_answer_json_reasons_and_store_nothing(living, tmp_path):
    before = _state(living)
    big = os.urandom(int(LIMIT_MB * 1024 * 1024) + 100_000)
    (tmp_path / "big.png").write_bytes(big)
    assert _upload(living, tmp_path / "big.png").status_code == 413  # Content-Length
    streamed = httpx.post(f"{living.base}/v1/images", content=_chunked_multipart(big * 4),
                          headers={**AUTH, "content-type": "multipart/form-data; boundary=bnd"},
                          timeout=60)
    assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
    (tmp_path / "notes.png").write_text("a text file named like an image")
    assert _upload(living, tmp_path / "notes.png").status_code == 415
    whole = living.scans[1].read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    cut = _upload(living, tmp_path / "cut.png")
    assert cut.status_code == 422 and cut.json()["detail"]
    bomb = _upload(living, png_header_only(tmp_path / "bomb.png", 30_000, 30_000))
    assert bomb.status_code == 422 and "pixel" in bomb.json()["detail"]
    for url in ("/v1/images/abc123", "/v1/images/abc123/thumbnail",
                f"/v1/images/{'0' * 64}/similar?table={TABLE}"):
        answer = httpx.get(living.base + url)
        assert answer.status_code == 404 and answer.json()["detail"], url
    assert _state(living) == before


def test_writes_need_the_token_and_off_loopback_needs_one_to_start(living):
    before = _state(living)
    assert _upload(living, living.scans[1], headers={}).status_code == 401
    wrong = _upload(living, living.scans[1], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"]
    assert httpx.get(f"{living.base}/v1/tables").status_code == 200  # reads open on loopback
    assert _state(living) == before
    refused = CliRunner().invoke(main, ["serve", "--store", str(living.store), "--host",
                                        "0.0.0.0"])
    assert refused.exit_code == 2 and "without --token" in refused.output


def test_a_table_added_while_serving_is_seen_and_one_that_cannot_load_stops_uploads_only(
        living):
    """A table whose weights file is gone appears without a restart, is reported unavailable
    and refuses uploads (503, nothing stored) while reads go on; removed, uploads resume."""
    from featurestore import Lineage

    store = Store(living.store)
    lineage = Lineage(backbone="densenet121", weights="file:gone.h5",
                      weights_sha256="0" * 64, pool="avg", input_size=32,
                      preprocessing="torch")
    with store.writer(lineage) as writer:
        writer.append(np.zeros((2, 4), np.float32), image_id=["a" * 64, "b" * 64],
                      label=["3", "8"], split=["train"] * 2)
    before = _state(living)
    try:
        health = httpx.get(f"{living.base}/healthz").json()
        assert health["uploads"] is False and "gone.h5" in \
            health["unavailable"][f"table {lineage.key}"]
        tables = {t["key"]: t for t in httpx.get(f"{living.base}/v1/tables").json()}
        assert tables[lineage.key]["available"] is False and tables[living.key]["available"]
        refused = _upload(living, living.scans[6])
        assert refused.status_code == 503 and lineage.key in refused.json()["detail"]
        assert _state(living) == before
        known = store.manifest().images()["image_id"].iloc[0]
        assert httpx.get(f"{living.base}/v1/images/{known}/similar",
                         params={"table": TABLE, "k": 2}).status_code == 200
    finally:
        shutil.rmtree(store.table_dir(lineage))
    health = httpx.get(f"{living.base}/healthz").json()
    assert (health["uploads"], health["unavailable"]) == (True, {})


def test_a_model_fitted_while_serving_is_listed_and_scores_the_next_upload(living):
    from pipelines.heads.fit import FitHeadsConfig, run_fit_heads

    fit = run_fit_heads(FitHeadsConfig(store=living.store, table=TABLE, heads=["svm"],
                                       search="none", cv=3), echo=lambda _: None)
    name = f"{living.key}/svm"
    try:
        assert name in [m["name"] for m in httpx.get(f"{living.base}/v1/models").json()]
        answer = _upload(living, living.scans[13])
        assert answer.status_code == 200, answer.text
        assert set(answer.json()["scores"]) == {f"{living.key}/logreg", name}
    finally:
        shutil.rmtree(fit.heads["svm"].model_dir)


def test_concurrent_similar_queries_share_one_product_and_answer_as_one_by_one(living):
    from pipelines.serve.searchers import Searchers

    store = Store(living.store)
    ids = list(store.manifest().images()["image_id"][:12])
    ks = {i: 2 + n % 4 for n, i in enumerate(ids)}  # a product for several k: each its own
    alone = Searchers(store, gather=False)
    expected = {i: alone.search(TABLE, i, ks[i]) for i in ids}
    gathered = Searchers(store, gather=True)
    gathered.search(TABLE, ids[0], 1)
    gather, answers = gathered._open[living.key].gather, {}
    with gather._ready:  # a product "running": every query must wait, then share the next
        gather._busy, products = True, gather.products
    threads = [threading.Thread(target=lambda i=i: answers.setdefault(
        i, gathered.search(TABLE, i, ks[i]))) for i in ids]
    for thread in threads:
        thread.start()
    while len(gather._waiting) < len(ids):
        time.sleep(0.001)
    with gather._ready:
        gather._busy = False
        gather._ready.notify_all()
    for thread in threads:
        thread.join()
    assert gather.products == products + 1
    for i in ids:
        assert list(answers[i]["image_id"]) == list(expected[i]["image_id"]), i
        np.testing.assert_allclose(answers[i]["distance"], expected[i]["distance"], atol=1e-6)


def test_start_up_cleanup_removes_only_abandoned_temporaries_of_ours(tmp_path):
    from pipelines.serve.service import ABANDONED_AFTER_S, remove_abandoned_uploads

    names = (f"{PARTIAL_PREFIX}old", ".tmp-0123abcd-old.png", f"{PARTIAL_PREFIX}live",
             ".tmp-4567cdef-live.png", "users-own.png")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    past = time.time() - ABANDONED_AFTER_S - 60
    for name in names[:2] + names[4:]:
        os.utime(tmp_path / name, (past, past))
    assert remove_abandoned_uploads(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_concurrent_uploads_and_a_cli_ingest_of_overlapping_files_land_once(living):
    """Four uploads batched by the server and, at the same time, an ingest in this process
    (a second writer of the same tables) of files that overlap them: one row per key."""
    from featurestore._io import hash_file
    from pipelines.ingest.run import IngestConfig, run_ingest

    rows_before = _state(living)[0]
    uploaded, ingested = living.scans[1:5], living.scans[3:7]
    answers, result = [None] * len(uploaded), {}

    def send(k):
        answers[k] = _upload(living, uploaded[k])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(uploaded))]
    threads.append(threading.Thread(target=lambda: result.setdefault("cli", run_ingest(
        IngestConfig(paths=ingested, store=living.store), echo=lambda _: None))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * len(uploaded)
    assert result["cli"].exit_code == 0 and not result["cli"].errors
    ids = {hash_file(p) for p in living.scans[1:7]}
    store = Store(living.store)
    with store.open(TABLE) as reader:
        meta = reader.metadata()
        assert SimilarityIndex.load(reader).rows == len(reader) == rows_before + len(ids)
    assert ids <= set(meta["image_id"]) and not meta.duplicated(["image_id", "aug_id"]).any()
    scores = store.scores()
    assert ids <= set(scores["image_id"])
    assert not scores.duplicated(["image_id", "model", "model_version"]).any()


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium through its chromedriver; in CI a missing one fails."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install chromium "
                    f"chromium-driver); CI requires them")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_review_page_uploads_shows_neighbours_and_drops_a_suspect_into_the_view(living,
                                                                                browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from featurestore.views import ViewStore

    wait = WebDriverWait(browser, 120)
    browser.get(living.base + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "upload-file").send_keys(str(living.scans[12]))
    browser.find_element(By.ID, "upload-button").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.neighbour"))
    image_id = browser.find_element(By.ID, "upload-id").text.split()[-1]
    shown = [img.get_attribute("data-image-id")
             for img in browser.find_elements(By.CSS_SELECTOR, "img.neighbour")]
    similar = httpx.get(f"{living.base}/v1/images/{image_id}/similar",
                        params={"table": TABLE, "k": len(shown)}).json()
    assert shown == [n["image_id"] for n in similar]
    assert browser.find_element(By.CSS_SELECTOR, "p.score").text.startswith(living.key)

    suspect = browser.find_element(By.CSS_SELECTOR, "tr.suspect")
    dropped = suspect.get_attribute("data-image-id")
    Select(suspect.find_element(By.NAME, "decision")).select_by_value("drop")
    suspect.find_element(By.NAME, "reason").send_keys("blurred scan")
    form = browser.find_element(By.CSS_SELECTOR, "form.review")
    form.find_element(By.NAME, "who").send_keys("dr-review")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda b: b.find_elements(By.ID, "saved-ok") or b.find_elements(By.ID,
                                                                               "saved-error"))
    assert browser.find_elements(By.ID, "saved-ok"), browser.find_element(By.ID,
                                                                          "saved-error").text
    view = ViewStore(living.store).get("reviewed")
    decision = view.decisions.set_index("image_id").loc[dropped]
    assert (decision["action"], decision["who"], decision["why"]) == \
        ("drop", "dr-review", "blurred scan")
    assert view.source["audit_run"] and view.decisions["decided_at"].notna().all()


def test_kill_9_mid_ingest_then_a_rerun_finishes_the_job(living):
    from pipelines.ingest.run import IngestConfig, run_ingest

    from featurestore._io import hash_file

    pending = living.scans[7:12]
    ids = {hash_file(p) for p in pending}
    threads = [threading.Thread(target=lambda p=p: _swallow(lambda: _upload(living, p)))
               for p in pending]
    for thread in threads:
        thread.start()
    copies = Store(living.store).paths.ingested
    deadline = time.monotonic() + 60
    while not any(copies.glob(f"{i}.*") for i in ids):  # the first step (the copy) is done
        assert time.monotonic() < deadline, "no upload reached the store"
        time.sleep(0.005)
    living.proc.send_signal(signal.SIGKILL)
    living.proc.wait()
    for thread in threads:
        thread.join()
    assert not ids <= set(Store(living.store).manifest().ingested()["image_id"])  # mid-ingest
    # The rerun is the CLI's ingest (the server's own code path) in this process: restarting
    # a server would only add a backbone build.
    rerun = run_ingest(IngestConfig(paths=pending, store=living.store), echo=lambda _: None)
    assert rerun.exit_code == 0 and not rerun.errors
    store = Store(living.store)
    with store.open(TABLE) as reader:
        meta = reader.metadata()
        assert SimilarityIndex.load(reader).rows == len(reader)
    assert not meta.duplicated(["image_id", "aug_id"]).any()
    assert {o.image_id for o in rerun.outcomes} == ids
    assert ids <= set(meta["image_id"]) and ids <= set(store.manifest().ingested()["image_id"])
    scores = store.scores()
    assert ids <= set(scores["image_id"]) and not scores.duplicated(["image_id", "model"]).any()
    # Left behind: only the killed server's upload buffers (its next start removes them);
    # no half copy, and every copy decodes.
    names = os.listdir(store.paths.ingested)
    assert all(n.startswith(PARTIAL_PREFIX) for n in names if n.startswith("."))
    for name in (n for n in names if not n.startswith(".")):
        Image.open(store.paths.ingested / name).verify()


def _swallow(call):
    try:
        call()
    except httpx.TransportError:
        pass  # the server was killed under it
