"""The Batch API in process, on SQLite and Postgres: files streamed to disk, validation, the keeper's steps,
leases taken over after a death, quotas, tenants, paging. The keeper runs one pass at a time in the test's thread;
a small fake worker finishes jobs through the shared job contract (``common.jobs``)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, func, select, text, update

from common import jobs
from common.ids import utcnow
from common.keys import KeyLimits, create_key
from common.models import Batch, Job, OpenAIBatch, StoredFile
from common.queue import QUEUES
from tests import webfixtures
from tests.webfixtures import REDIS_URL, b64, build_app, png_bytes, services_of
from web.openai.batch_keeper import BatchKeeper, claim

db_url = webfixtures.db_url

MODEL = "demo"
IMAGE = "data:image/png;base64," + b64(png_bytes())


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app with a 1 s completion window allowed, a short lease, and empty batch tables."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    app = build_app(db_url, tmp_path, batch_windows="24h,1s", batch_lease_s=1.0, key_cache_s=0)
    with services_of(app).engine.begin() as conn:
        for table in ("openai_batches", "files", "message_images", "jobs", "batches", "messages", "images",
                      "sessions", "api_keys", "usage_days"):
            conn.execute(text(f"DELETE FROM {table}"))
    yield app
    services_of(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def keeper(app: Flask) -> Iterator[BatchKeeper]:
    keeper = BatchKeeper(app, inline=True)
    yield keeper
    keeper.stop()


def line(custom_id: str, text: str = "Describe it.", image: str | None = None, **body: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **body}}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def upload(client: FlaskClient, data: bytes, headers: dict[str, str] | None = None, **fields: str) -> Any:
    form = {"purpose": "batch", **fields, "file": (io.BytesIO(data), "input.jsonl")}
    return client.post("/v1/files", data=form, content_type="multipart/form-data", headers=headers or {})


def create(client: FlaskClient, rows: list[Any], headers: dict[str, str] | None = None, **extra: Any) -> dict:
    file_id = upload(client, jsonl(rows), headers).get_json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **extra}
    answer = client.post("/v1/batches", json=body, headers=headers or {})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def finish_all(app: Flask, fail: dict[str, str] | None = None) -> int:
    """Play the worker: claim every queued job and finish it (succeeded, or failed with ``fail[custom_id]``)."""
    done = 0
    with services_of(app).session_factory() as db:
        for job in jobs.claim_next(db, "w", lease_s=30, max_attempts=3, limit=10_000, queues=QUEUES):
            code = (fail or {}).get(job.item_name or "")
            outcome = jobs.Outcome(status="failed" if code else "succeeded", response="" if code else "ok",
                                   finish_reason=None if code else "stop", error_code=code, error_message=code,
                                   prompt_tokens=10, completion_tokens=2, timings={}, model=MODEL)
            done += jobs.finish(db, job.id, "w", outcome)
    return done


def batch(client: FlaskClient, batch_id: str, headers: dict[str, str] | None = None) -> dict:
    return client.get(f"/v1/batches/{batch_id}", headers=headers or {}).get_json()


def content(client: FlaskClient, file_id: str) -> dict[str, dict]:
    raw = client.get(f"/v1/files/{file_id}/content").data.decode()
    return {row["custom_id"]: row for row in map(json.loads, raw.splitlines())}


def count(app: Flask, model: Any, *where: Any) -> int:
    with services_of(app).session_factory() as db:
        return db.scalar(select(func.count()).select_from(model).where(*where)) or 0


def test_a_file_is_streamed_to_disk_listed_read_and_deleted(client: FlaskClient, app: Flask) -> None:
    data = jsonl([line("a"), line("b")])
    made = upload(client, data, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    assert made.status_code == 200, made.get_json()
    body = made.get_json()
    assert body["object"] == "file" and body["purpose"] == "batch" and body["bytes"] == len(data)
    assert body["filename"] == "input.jsonl" and body["expires_at"] - body["created_at"] == 3600
    files = services_of(app).settings.files_path
    assert (files / body["id"]).read_bytes() == data and not list(files.glob(".*.part"))
    assert client.get(f"/v1/files/{body['id']}").get_json() == body
    assert client.get(f"/v1/files/{body['id']}/content").data == data
    assert [f["id"] for f in client.get("/v1/files?purpose=batch").get_json()["data"]] == [body["id"]]
    assert client.delete(f"/v1/files/{body['id']}").get_json() == {"id": body["id"], "object": "file", "deleted": True}
    assert not (files / body["id"]).exists() and count(app, StoredFile) == 0
    assert client.get(f"/v1/files/{body['id']}").status_code == 404


def test_refused_uploads_leave_nothing(client: FlaskClient, app: Flask, tmp_path: Path) -> None:
    small = build_app(services_of(app).settings.database_url, tmp_path / "small", max_file_bytes=1000)
    too_big = upload(small.test_client(), b"x" * 5000)
    assert too_big.status_code == 413 and too_big.get_json()["error"]["param"] == "file"
    services_of(small).close()
    assert upload(client, b"{}", purpose="fine-tune").get_json()["error"]["param"] == "purpose"
    bad = upload(client, b"{}", **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"})
    assert bad.status_code == 400 and "expires_after" in bad.get_json()["error"]["message"]
    assert client.post("/v1/files", json={"purpose": "batch"}).status_code == 415
    assert count(app, StoredFile) == 0
    for folder in (services_of(app).settings.files_path, tmp_path / "small" / "files"):
        assert not folder.exists() or not list(folder.iterdir())


def test_a_batch_runs_its_lines_as_jobs_and_writes_output_and_error_files(client: FlaskClient, app: Flask,
                                                                         keeper: BatchKeeper) -> None:
    rows = [line("img", image=IMAGE), line("two", n=2, temperature=1), line("boom"),
            line("bad-image", image="data:image/png;base64," + b64(b"not a png")),
            {"custom_id": "multi", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"}]}}]
    made = create(client, rows, metadata={"project": "tests"})
    assert made["status"] == "validating" and made["metadata"] == {"project": "tests"}
    keeper.tick()
    running = batch(client, made["id"])
    assert running["status"] == "in_progress" and running["request_counts"] == {"total": 5, "completed": 0,
                                                                                  "failed": 1}
    assert count(app, Job, Job.batch_id == made["id"]) == 5 and count(app, Job, Job.queue == "batch") == 5
    vlgate = client.get(f"/api/batches/{made['id']}").get_json()
    assert vlgate["total"] == 5 and vlgate["counts"]["queued"] == 4 and vlgate["counts"]["failed"] == 1
    with services_of(app).session_factory() as db:
        spec = db.scalar(select(Job.spec).where(Job.item_name == "multi"))
        assert [t["role"] for t in spec["turns"]] == ["system", "user"]
        assert db.scalar(select(Job.spec).where(Job.item_name == "two"))["sampling"]["n"] == 2
    assert finish_all(app, fail={"boom": "context_length_exceeded"}) == 4
    keeper.tick()  # settle: finalizing
    keeper.tick()  # finish
    done = batch(client, made["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
    assert done["usage"]["input_tokens"] == 40 and done["usage"]["total_tokens"] == 48
    assert done["completed_at"] >= done["finalizing_at"] >= done["in_progress_at"] >= done["created_at"]
    output, errors = content(client, done["output_file_id"]), content(client, done["error_file_id"])
    assert set(output) == {"img", "two", "multi"} and set(errors) == {"boom", "bad-image"}
    assert output["img"]["response"]["status_code"] == 200 and output["img"]["error"] is None
    assert output["img"]["response"]["body"]["object"] == "chat.completion"
    assert output["img"]["response"]["body"]["id"] == "chatcmpl-" + output["img"]["response"]["request_id"]
    assert errors["bad-image"]["response"]["status_code"] == 400
    assert errors["bad-image"]["response"]["body"]["error"]["code"] == "invalid_image"
    assert errors["boom"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    out_file = client.get(f"/v1/files/{done['output_file_id']}").get_json()
    assert out_file["purpose"] == "batch_output" and out_file["filename"] == f"{made['id']}_output.jsonl"
    keeper.tick()  # nothing more to do: nothing doubled
    assert count(app, StoredFile, StoredFile.purpose == "batch_output") == 2


def test_structural_errors_fail_the_batch_naming_each_line(client: FlaskClient, app: Flask,
                                                          keeper: BatchKeeper) -> None:
    rows = [line("ok"), b"{not json", line("ok"), {**line("x"), "url": "/v1/embeddings"}, line("m", model="gpt-4o"),
            line("t", temperature=5), {**line("y"), "method": "GET"}, {"method": "POST"}]
    made = create(client, rows)
    keeper.tick()
    failed = batch(client, made["id"])
    assert failed["status"] == "failed" and failed["failed_at"] and failed["request_counts"]["total"] == 0
    found = [(e["line"], e["code"], e["param"]) for e in failed["errors"]["data"]]
    assert found == [(2, "invalid_json_line", None), (3, "duplicate_custom_id", "custom_id"),
                     (4, "url_mismatch", "url"), (5, "model_mismatch", "body.model"),
                     (6, "invalid_request", "body.temperature"), (7, "invalid_method", "method"),
                     (8, "missing_custom_id", "custom_id")]
    assert count(app, Job) == 0 and count(app, Batch) == 0


def test_cancel_while_validating_or_running(client: FlaskClient, app: Flask, keeper: BatchKeeper) -> None:
    early = create(client, [line("a"), line("b")])
    assert client.post(f"/v1/batches/{early['id']}/cancel").get_json()["status"] == "cancelling"
    keeper.tick()
    assert batch(client, early["id"])["status"] == "cancelled" and count(app, Job) == 0
    late = create(client, [line(str(i)) for i in range(4)])
    keeper.tick()
    assert client.post(f"/v1/batches/{late['id']}/cancel").get_json()["status"] == "cancelling"
    assert count(app, Job, Job.status == "queued") == 4  # the keeper cancels them, woken by the route
    keeper.tick()
    ended = batch(client, late["id"])
    assert ended["status"] == "cancelled" and ended["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
    errors = content(client, ended["error_file_id"])
    assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
    assert ended["output_file_id"] is None
    assert client.post(f"/v1/batches/{late['id']}/cancel").status_code == 200  # again: as it is
    finished = create(client, [line("z")])
    keeper.tick()
    finish_all(app)
    keeper.tick()
    keeper.tick()
    assert client.post(f"/v1/batches/{finished['id']}/cancel").status_code == 409


def test_the_window_passes_and_the_batch_expires(client: FlaskClient, app: Flask, keeper: BatchKeeper) -> None:
    made = create(client, [line(str(i)) for i in range(3)], completion_window="1s")
    keeper.tick()
    with services_of(app).session_factory() as db:
        first = jobs.claim_next(db, "w", lease_s=30, max_attempts=3, limit=1, queues=QUEUES)[0]
        jobs.finish(db, first.id, "w", jobs.Outcome(status="succeeded", response="ok", finish_reason="stop",
                                                    prompt_tokens=1, completion_tokens=1, timings={}, model=MODEL))
    time.sleep(1.1)
    keeper.tick()
    ended = batch(client, made["id"])
    assert ended["status"] == "expired" and ended["expired_at"] and ended["request_counts"]["completed"] == 1
    assert {r["error"]["code"] for r in content(client, ended["error_file_id"]).values()} == {"batch_expired"}
    assert list(content(client, ended["output_file_id"])) == [first.item_name]


def test_a_validation_whose_process_died_is_taken_over_without_doubles(client: FlaskClient, app: Flask,
                                                                      keeper: BatchKeeper) -> None:
    made = create(client, [line(str(i)) for i in range(5)])
    with services_of(app).session_factory() as db:  # a validator claimed it, stored two items, and died
        assert claim(db, made["id"], "validating", 0.2, count_attempt=True)
        db.add(Batch(id=made["id"], source="openai", total=0, params={}, cancel_requested=False))
        db.add_all(Job(id=f"job_{i:024x}", batch_id=made["id"], batch_index=i, queue="batch", status="queued",
                       params={}, attempts=0) for i in range(2))
        db.commit()
    keeper.tick()  # its lease still holds: left alone
    assert batch(client, made["id"])["status"] == "validating"
    time.sleep(0.3)
    keeper.tick()
    taken = batch(client, made["id"])
    assert taken["status"] == "in_progress" and taken["request_counts"]["total"] == 5
    with services_of(app).session_factory() as db:
        names = db.scalars(select(Job.item_name).where(Job.batch_id == made["id"]).order_by(Job.batch_index)).all()
    assert names == ["0", "1", "2", "3", "4"]


def test_a_finish_whose_process_died_is_done_once(client: FlaskClient, app: Flask, keeper: BatchKeeper) -> None:
    made = create(client, [line("a"), line("b")])
    keeper.tick()
    finish_all(app)
    with services_of(app).session_factory() as db:  # a finisher claimed it and died before writing
        db.execute(update(OpenAIBatch).values(status="finalizing", finalizing_at=utcnow()))
        db.commit()
        assert claim(db, made["id"], "finalizing", 0.2)
    keeper.tick()
    assert batch(client, made["id"])["status"] == "finalizing"
    time.sleep(0.3)
    keeper.tick()
    done = batch(client, made["id"])
    assert done["status"] == "completed" and len(content(client, done["output_file_id"])) == 2
    assert count(app, StoredFile, StoredFile.purpose == "batch_output") == 1


def test_quotas_refuse_a_batch_whole(client: FlaskClient, app: Flask, keeper: BatchKeeper) -> None:
    with services_of(app).session_factory() as db:
        secret = create_key(db, "small", limits=KeyLimits(max_queued=2)).secret
    headers = {"Authorization": f"Bearer {secret}"}
    made = create(client, [line(str(i)) for i in range(3)], headers)
    keeper.tick()
    failed = batch(client, made["id"], headers)
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["code"] == "too_many_queued"
    assert count(app, Job) == 0


def test_another_tenants_files_and_batches_are_not_found(client: FlaskClient, app: Flask) -> None:
    with services_of(app).session_factory() as db:
        alice = {"Authorization": f"Bearer {create_key(db, 'alice').secret}"}
        bob = {"Authorization": f"Bearer {create_key(db, 'bob').secret}"}
    made = create(client, [line("a")], alice)
    assert client.get(f"/v1/batches/{made['id']}", headers=bob).status_code == 404
    assert client.post(f"/v1/batches/{made['id']}/cancel", headers=bob).status_code == 404
    assert client.get(f"/v1/files/{made['input_file_id']}/content", headers=bob).status_code == 404
    assert client.delete(f"/v1/files/{made['input_file_id']}", headers=bob).status_code == 404
    assert client.get("/v1/batches", headers=bob).get_json()["data"] == []
    theirs = {"input_file_id": made["input_file_id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert client.post("/v1/batches", json=theirs, headers=bob).get_json()["error"]["code"] == "file_not_found"
    with services_of(app).session_factory() as db:
        assert db.get(OpenAIBatch, made["id"]).tenant == "alice"


def test_batches_are_paged_by_cursor(client: FlaskClient, app: Flask) -> None:
    made = [create(client, [line("a")])["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/v1/batches", query_string={"limit": 2, **({"after": after} if after else {})}).get_json()
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == made[::-1]
    oldest = client.get("/v1/batches?order=asc&limit=1").get_json()
    assert oldest["data"][0]["id"] == made[0] and oldest["has_more"]
    assert client.get("/v1/batches?limit=0").status_code == 400
    assert client.get("/v1/batches?after=batch_nothing").status_code == 404


@pytest.mark.parametrize(("change", "param"), [
    ({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "48h"}, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"), ({"input_file_id": "file_nope"}, "input_file_id"),
])
def test_a_bad_create_is_a_400_naming_the_field(client: FlaskClient, app: Flask, change: dict, param: str) -> None:
    file_id = upload(client, jsonl([line("a")])).get_json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
    answer = client.post("/v1/batches", json=body)
    assert answer.status_code in (400, 404) and answer.get_json()["error"]["param"] == param
    assert count(app, OpenAIBatch) == 0


def test_expired_files_are_swept(client: FlaskClient, app: Flask, keeper: BatchKeeper) -> None:
    body = upload(client, b"{}\n").get_json()
    with services_of(app).session_factory() as db:
        db.execute(update(StoredFile).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.commit()
    assert client.get(f"/v1/files/{body['id']}").status_code == 404
    keeper.tick()
    assert count(app, StoredFile) == 0
    assert not (services_of(app).settings.files_path / body["id"]).exists()
    with services_of(app).session_factory() as db:
        db.execute(delete(StoredFile))
