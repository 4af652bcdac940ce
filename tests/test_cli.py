"""The command-line client against a real server (gunicorn web, Celery worker with the demo model, Redis, SQLite):
results in order, resume without redoing finished files, an interrupted run followed instead of re-uploaded."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, func, select
from werkzeug.formparser import parse_form_data

from common.models import Batch, Job
from devtools import live
from devtools.databases import make_image
from devtools.live import Stack
from vlgate_cli.batch import progress_bar
from vlgate_cli.cli import main
from vlgate_cli.multipart import FilePart, MultipartBody

pytestmark = pytest.mark.slow

PROMPT = "Tag this photo."
VLGATE = live.ROOT / ".venv" / "bin" / "vlgate"  # the console script `make install` (pip install -e .) puts there


def vlgate_env(server: str | None) -> dict[str, str]:
    """The environment of the installed command, with VLGATE_URL set (or unset) and no key."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLGATE_URL", "VLGATE_API_KEY")}
    return {**env, "VLGATE_URL": server} if server else env


def vlgate(cwd: Path, server: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `vlgate` from ``cwd`` (not the checkout), as a user's shell would."""
    assert VLGATE.exists(), "make install installs the project (pip install --no-deps -e .): .venv/bin/vlgate"
    return subprocess.run([str(VLGATE), *args], cwd=cwd, env=vlgate_env(server), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    with live.running_stack("sqlite", tmp_path_factory.mktemp("cli"), data_dir, "cli-w1") as deployment:
        yield deployment


def add_images(folder: Path, names: list[str]) -> None:
    """Write a small, distinct PNG for each name (subfolders included)."""
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image((32 + i, 32), (20 * i % 256, 90, 160)))


def run_cli(stack: Stack, folder: Path, out: Path, *extra: str) -> Result:
    args = ["batch", str(folder), "--prompt", PROMPT, "--out", str(out), "--server", stack.base,
            "--temperature", "0", "--max-tokens", "4", "--quiet", *extra]
    return CliRunner().invoke(main, args)


def read_out(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def server_batches(stack: Stack) -> dict[str, list[str]]:
    """Every batch on the server, in creation order, with its items' names in input order."""
    with stack.db.connect() as conn:
        ids = conn.execute(select(Batch.id).order_by(Batch.created_at, Batch.id)).scalars().all()
        return {batch_id: list(conn.execute(select(Job.item_name).where(Job.batch_id == batch_id)
                                            .order_by(Job.batch_index)).scalars()) for batch_id in ids}


def test_multipart_body_streams_exactly_its_length_and_werkzeug_reads_the_names(tmp_path: Path):
    names = ["plain.png", 'quote "q".png', "back\\slash.png", "中文/照片.jpg"]
    add_images(tmp_path, names)
    parts = [FilePart(name, tmp_path / name, (tmp_path / name).stat().st_size) for name in names]
    sent: list[int] = []
    body = MultipartBody([("prompt", "Was ist das? 这是什么？"), ("stop", "a"), ("stop", "b")], parts,
                         on_bytes=sent.append)
    raw = b"".join(body)
    assert len(raw) == len(body) == sum(sent)
    environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": body.content_type, "CONTENT_LENGTH": str(len(raw)),
               "wsgi.input": io.BytesIO(raw)}
    _, form, files = parse_form_data(environ)
    assert form["prompt"] == "Was ist das? 这是什么？" and form.getlist("stop") == ["a", "b"]
    received = files.getlist("files")
    assert [f.filename for f in received] == names
    assert received[3].mimetype == "image/jpeg" and received[0].read() == (tmp_path / names[0]).read_bytes()


def test_unreachable_server_is_exit_2_with_a_clear_message(tmp_path: Path):
    add_images(tmp_path / "in", ["a.png"])
    port = live.free_port()
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "in"), "-p", PROMPT, "-o", str(tmp_path / "o.jsonl"),
                                       "--server", f"http://127.0.0.1:{port}", "-q"])
    assert result.exit_code == 2
    assert f"cannot reach the vlgate server at http://127.0.0.1:{port}" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_one_line_per_file_in_order_and_reruns_upload_only_what_is_missing(stack: Stack, tmp_path: Path):
    folder, out = tmp_path / "photos", tmp_path / "out" / "results.jsonl"
    names = [f"img_{i:02d}.png" for i in range(12)] + ["sub/deep.png"]
    add_images(folder, names)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(make_image())
    expected = sorted([*names, "broken.png"])
    before = server_batches(stack)

    first = run_cli(stack, folder, out, "--recursive", "--chunk", "5")
    assert first.exit_code == 1, first.output  # one file failed
    assert "1 of 14 files have no successful result yet (e.g. broken.png)" in first.output
    lines = read_out(out)
    assert [line["name"] for line in lines] == expected
    by_name = {line["name"]: line for line in lines}
    assert by_name["broken.png"]["status"] == "failed" and by_name["broken.png"]["error"]["code"] == "invalid_image"
    assert all(line["status"] == "succeeded" and line["response"] for line in lines if line["name"] != "broken.png")
    assert all(line["usage"]["completion_tokens"] <= 4 for line in lines if line["status"] == "succeeded")
    created = {k: v for k, v in server_batches(stack).items() if k not in before}
    assert list(created.values()) == [expected[0:5], expected[5:10], expected[10:14]]  # chunks of 5, in order
    assert [line["batch_id"] for line in lines] == [b for b, items in created.items() for _ in items]
    assert not Path(f"{out}.state.json").exists()

    # Again: only the failed file is sent; the succeeded lines stay exactly as they were.
    again = run_cli(stack, folder, out, "--recursive", "--chunk", "5")
    assert again.exit_code == 1, again.output
    assert "13 already succeeded" in again.output
    retried = {k: v for k, v in server_batches(stack).items() if k not in before and k not in created}
    assert list(retried.values()) == [["broken.png"]]
    relines = read_out(out)
    assert [line["name"] for line in relines] == expected  # still one line per file
    assert [line for line in relines if line["name"] != "broken.png"] == \
           [line for line in lines if line["name"] != "broken.png"]
    assert {line["batch_id"] for line in relines if line["name"] == "broken.png"} == set(retried)

    # Three new files: those and the failed one go up, nothing else.
    add_images(folder, ["img_05b.png", "new/one.png", "zzz.png"])
    known = set(server_batches(stack))
    third = run_cli(stack, folder, out, "--recursive", "--chunk", "5")
    assert third.exit_code == 1, third.output
    newest = {k: v for k, v in server_batches(stack).items() if k not in known}
    assert list(newest.values()) == [["broken.png", "img_05b.png", "new/one.png", "zzz.png"]]
    final = read_out(out)
    assert sorted(line["name"] for line in final) == sorted([*expected, "img_05b.png", "new/one.png", "zzz.png"])
    assert len(final) == 17

    # status / cancel on a finished batch, and the results command.
    batch_id = next(iter(newest))
    status = CliRunner().invoke(main, ["status", batch_id, "--server", stack.base])
    assert status.exit_code == 0 and f"{batch_id}: completed, 100% of 4 items final" in status.output
    csv_out = CliRunner().invoke(main, ["results", batch_id, "--format", "csv", "--server", stack.base])
    assert csv_out.output.splitlines()[0].startswith("\ufeffindex,name,job_id,status")  # BOM: Excel reads UTF-8
    missing = CliRunner().invoke(main, ["status", "batch_" + "0" * 24, "--server", stack.base])
    assert missing.exit_code == 2 and "batch_not_found" in missing.output


def start_cli(stack: Stack, folder: Path, out: Path, *extra: str, installed: bool = False) -> subprocess.Popen[str]:
    """Run the CLI as a real process that Ctrl-C (SIGINT) can interrupt: ``python -m vlgate_cli --server`` in the
    checkout, or the installed ``vlgate`` in the results' folder with the address from VLGATE_URL."""
    args = ["batch", str(folder), "--prompt", PROMPT, "--out", str(out), "--max-tokens", "1000", "--min-tokens",
            "1000", "--quiet", *extra]
    if installed:
        argv, cwd, env = [str(VLGATE), *args], out.parent, vlgate_env(stack.base)
    else:
        argv, cwd, env = [sys.executable, "-m", "vlgate_cli", *args, "--server", stack.base], live.ROOT, None
    # A child started from a non-interactive shell may inherit SIGINT as ignored; Python then never raises
    # KeyboardInterrupt. Restore the default so the signal means what Ctrl-C means.
    return subprocess.Popen(argv, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after_upload(proc: subprocess.Popen[str], out: Path, lines: int = 0) -> tuple[int, str, str]:
    """Wait for the state file (the upload was accepted) and ``lines`` results written, press Ctrl-C, return
    (exit code, stderr, batch id)."""
    state = Path(f"{out}.state.json")
    live.wait_until(lambda: state.exists() or proc.poll() is not None, 60, 0.02, "the upload to be recorded")
    batch_id = json.loads(state.read_text())["batch_id"]
    if lines:
        written = lambda: out.exists() and len(out.read_text().splitlines()) >= lines  # noqa: E731
        live.wait_until(lambda: written() or proc.poll() is not None, 180, 0.05, "a result written")
        assert proc.poll() is None and state.exists(), "the batch ended before its first result was written"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    return proc.returncode, stderr, batch_id


FRAMES = 12


def test_an_interrupted_run_is_resumed_by_following_its_batch(stack: Stack, tmp_path: Path):
    # The installed `vlgate`, run from the results' folder with the server in VLGATE_URL. A result is in the
    # file as soon as its item finishes, while the batch still runs; the hint names the server it used.
    # More items than the worker runs at once, so the first ones finish well before the last.
    folder, out = tmp_path / "frames", tmp_path / "frames.jsonl"
    names = [f"f{i:02d}.png" for i in range(FRAMES)]
    add_images(folder, names)
    code, stderr, batch_id = interrupt_after_upload(start_cli(stack, folder, out, installed=True), out, lines=1)
    assert code == 130, stderr
    assert f"Batch {batch_id} keeps running on the server" in stderr
    assert f"`vlgate cancel {batch_id} --server {stack.base}`" in stderr
    assert requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10).json()["status"] == "running"
    early = read_out(out)
    assert 0 < len(early) < FRAMES and {line["batch_id"] for line in early} == {batch_id}
    known = set(server_batches(stack))

    resumed = run_cli(stack, folder, out)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming batch {batch_id} ({FRAMES} items) instead of uploading it again" in resumed.output
    assert set(server_batches(stack)) == known  # nothing uploaded again
    lines = read_out(out)
    assert sorted(line["name"] for line in lines) == names  # each once, the early lines kept as they were
    assert all(line in lines for line in early)
    assert {line["batch_id"] for line in lines} == {batch_id}
    assert all(line["status"] == "succeeded" for line in lines)
    assert not Path(f"{out}.state.json").exists()


def test_cancel_on_exit_cancels_the_batch_and_keeps_what_finished(stack: Stack, tmp_path: Path):
    folder, out = tmp_path / "scans", tmp_path / "scans.jsonl"
    add_images(folder, [f"s{i}.png" for i in range(6)])
    code, stderr, batch_id = interrupt_after_upload(start_cli(stack, folder, out, "--cancel-on-exit"), out)
    assert code == 130 and f"Cancelled batch {batch_id}" in stderr, stderr
    batch = requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10).json()
    assert batch["status"] == "cancelled" and batch["counts"]["cancelled"] >= 1
    lines = read_out(out)
    assert len(lines) == 6 and {line["status"] for line in lines} <= {"succeeded", "cancelled"}
    assert not Path(f"{out}.state.json").exists()


def test_no_loaded_model_is_exit_2_before_anything_is_uploaded(stack: Stack, tmp_path: Path):
    # A second web process on a Redis database where no worker beats: the model is not loaded there.
    port = live.free_port()
    env = {**stack.env, "VLGATE_REDIS_URL": f"redis://127.0.0.1:{stack.redis_port}/5", "VLGATE_MODEL_WAIT_S": "0"}
    lonely = live.web(port, env, stack.log_dir, name="web-no-worker").start()
    try:
        live.wait_for_web(f"http://127.0.0.1:{port}")
        add_images(tmp_path / "in", ["a.png", "b.png"])
        known = set(server_batches(stack))
        result = CliRunner().invoke(main, ["batch", str(tmp_path / "in"), "-p", PROMPT, "-o", str(tmp_path / "o.jsonl"),
                                           "--server", f"http://127.0.0.1:{port}", "-q"])
        assert result.exit_code == 2, result.output
        assert "model_not_loaded: the model is not loaded: no worker is running" in result.output
        assert set(server_batches(stack)) == known
    finally:
        lonely.stop()


TAGS = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["photo", "scan", "mockup"]},
                                         "label": {"type": "string", "maxLength": 10}},
        "required": ["kind", "label"], "additionalProperties": False}


def test_a_json_schema_tags_every_image_with_valid_json(stack: Stack, tmp_path: Path):
    import jsonschema

    folder, out, schema = tmp_path / "shop", tmp_path / "tags.jsonl", tmp_path / "product tags.json"
    add_images(folder, [f"p{i}.png" for i in range(4)])
    schema.write_text(json.dumps(TAGS))
    result = run_cli(stack, folder, out, "--json-schema", str(schema), "--max-tokens", "200", "--temperature", "1")
    assert result.exit_code == 0, result.output
    lines = read_out(out)
    assert [line["name"] for line in lines] == [f"p{i}.png" for i in range(4)]
    for line in lines:
        jsonschema.validate(json.loads(line["response"]), TAGS)
    with stack.db.connect() as conn:
        spec = conn.execute(select(Job.spec).where(Job.item_name == "p0.png")).scalars().all()[-1]
    assert spec["sampling"]["response_format"]["json_schema"]["name"] == "product_tags"
    bad = CliRunner().invoke(main, ["batch", str(folder), "-p", PROMPT, "-o", str(tmp_path / "x.jsonl"),
                                    "--server", stack.base, "--json", "--json-schema", str(schema), "-q"])
    assert bad.exit_code == 2 and "not both" in bad.output


def test_api_key_goes_as_bearer_from_the_option_or_the_environment_and_a_401_says_why(stack: Stack, tmp_path: Path):
    # A second web that requires keys, on its own database (the module's stack stays open for the other tests)
    # and the stack's Redis, where the worker beats: the model is ready, so the upload itself is refused.
    from sqlalchemy.orm import Session

    from common.keys import create_key
    from devtools.databases import fresh_database

    database = next(fresh_database("sqlite", tmp_path))
    with Session(engine := create_engine(database)) as db:
        secret = create_key(db, "cli-team").secret
    port = live.free_port()
    env = {**stack.env, "VLGATE_DATABASE_URL": database, "VLGATE_AUTH": "required"}
    keyed = live.web(port, env, stack.log_dir, name="web-keys").start()
    server = f"http://127.0.0.1:{port}"
    try:
        live.wait_for_web(server)
        add_images(tmp_path / "in", ["a.png"])
        args = ["batch", str(tmp_path / "in"), "-p", PROMPT, "-o", str(tmp_path / "o.jsonl"), "--server", server, "-q"]
        refused = CliRunner().invoke(main, args, env={"VLGATE_API_KEY": None})
        assert refused.exit_code == 2, refused.output
        assert "missing_api_key (HTTP 401): This server requires an API key" in refused.output
        assert "--api-key or the VLGATE_API_KEY environment variable" in refused.output
        wrong = CliRunner().invoke(main, [*args, "--api-key", "vlg_00000000_" + "x" * 43])
        assert wrong.exit_code == 2 and "invalid_api_key (HTTP 401): The API key is not valid" in wrong.output
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Job)).scalar() == 0  # nothing was stored

        missing = "batch_" + "0" * 24  # the key gets past the gate: the answer is the batch's own 404
        for command in (["status", missing], ["results", missing], ["cancel", missing]):
            by_env = CliRunner().invoke(main, [*command, "--server", server], env={"VLGATE_API_KEY": secret})
            assert by_env.exit_code == 2 and "batch_not_found" in by_env.output, by_env.output
        by_option = CliRunner().invoke(main, ["status", missing, "--server", server, "--api-key", secret])
        assert by_option.exit_code == 2 and "batch_not_found" in by_option.output
        assert "missing_api_key" in CliRunner().invoke(main, ["status", missing, "--server", server],
                                                       env={"VLGATE_API_KEY": None}).output
    finally:
        keyed.stop()
        engine.dispose()


def test_the_installed_command_works_from_any_directory_with_the_server_from_vlgate_url(stack: Stack,
                                                                                       tmp_path: Path):
    elsewhere = tmp_path / "somewhere" / "else"
    add_images(elsewhere / "in", ["a.png", "b.png"])
    done = vlgate(elsewhere, stack.base, "batch", "in", "-p", PROMPT, "-o", "out.jsonl", "--max-tokens", "4", "-q")
    assert done.returncode == 0, done.stderr
    lines = read_out(elsewhere / "out.jsonl")
    assert [line["name"] for line in lines] == ["a.png", "b.png"] and {line["status"] for line in lines} == {
        "succeeded"}
    batch_id = lines[0]["batch_id"]
    shown = vlgate(elsewhere, stack.base, "status", batch_id)
    assert shown.returncode == 0 and f"{batch_id}: completed" in shown.stdout, shown.stderr

    # --server wins over VLGATE_URL; without either the default address is tried, and the message says how to set it.
    dead = f"http://127.0.0.1:{live.free_port()}"
    assert vlgate(elsewhere, dead, "status", batch_id, "--server", stack.base).returncode == 0
    refused = vlgate(elsewhere, dead, "status", batch_id)
    assert refused.returncode == 2 and f"cannot reach the vlgate server at {dead}" in refused.stderr
    assert "--server or VLGATE_URL" in refused.stderr
    assert "VLGATE_URL" in " ".join(vlgate(elsewhere, None, "batch", "--help").stdout.split())
    assert "--port" in vlgate(elsewhere, None, "serve", "--help").stdout  # `make run`'s program, options and all
    # `vlgate serve --port N` reaches run_local's own check (the port is taken: the stack's web holds it).
    taken = stack.base.rsplit(":", 1)[1]
    busy = vlgate(elsewhere, None, "serve", "--port", taken)
    assert busy.returncode == 1 and f"Port {taken} is already in use" in busy.stderr, busy.stderr
    assert "--stop-timeout" in vlgate(elsewhere, None, "worker", "--help").stdout
    assert vlgate(elsewhere, None, "keys", "--help").returncode == 0


def test_the_rate_after_a_resume_counts_only_what_this_run_saw_finish():
    bar = progress_bar(total=1000, already=900, quiet=False)
    try:
        bar.n = 905  # five items finished since the resume, in a fraction of a second
        rate = bar.format_dict["elapsed"] and (bar.n - bar.format_dict["initial"]) / bar.format_dict["elapsed"]
        shown = re.search(r"([\d.]+)img/s", str(bar))
        assert bar.format_dict["initial"] == 900 and shown, str(bar)
        assert float(shown.group(1)) == pytest.approx(rate, rel=0.5)  # 5 per elapsed second, not 905
    finally:
        bar.close()
