"""The ``vlgate`` command: ``serve``, ``worker``, ``batch`` (a folder of images), ``status``, ``results``,
``cancel`` and ``keys``. Installed as a console script by pyproject.toml; ``python -m vlgate_cli`` is the same."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from vlgate_cli.batch import BatchOptions, BatchRun
from vlgate_cli.client import Client
from vlgate_cli.keys import keys

DEFAULT_SERVER = "http://127.0.0.1:8501"

server_option = click.option("--server", envvar="VLGATE_URL", show_envvar=True, default=DEFAULT_SERVER,
                             show_default=True, metavar="URL", help="Address of the vlgate web server.")
# serve and worker hand every argument, --help included, to the program they start.
PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
api_key_option = click.option("--api-key", envvar="VLGATE_API_KEY", show_envvar=True, metavar="KEY",
                              help="API key (vlg_…), sent as 'Authorization: Bearer'; needed when the server "
                                   "requires keys. Prefer the environment variable: a command line is visible "
                                   "to other users of the machine.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Serve vlgate, run its workers, run bulk image batches against a server, and manage API keys."""


main.add_command(keys)


@main.command(context_settings=PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve everything on this host, as `make run` does: Redis, migrations, workers, the web (--port, --host)."""
    from scripts.run_local import main as run_local

    run_local.main(args=list(args), prog_name="vlgate serve")


@main.command(context_settings=PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run the Celery worker(s) of this machine, one per GPU, restarted when they die (as docker/worker.sh)."""
    from scripts.supervise import main as supervise

    supervise.main(args=list(args), prog_name="vlgate worker")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", "-p", required=True, help="The question asked about every image.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results file (JSONL). Rerunning with the same file resumes.")
@server_option
@api_key_option
@click.option("--temperature", type=click.FloatRange(0, 2), help="0 = greedy. Server default 0.5.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Longest answer. Server default 512.")
@click.option("--min-tokens", type=click.IntRange(min=0), help="Shortest answer.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", type=click.IntRange(0, 1000), help="0 = off.")
@click.option("--repetition-penalty", type=click.FloatRange(0, 2, min_open=True))
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Same seed, same answer.")
@click.option("--stop", multiple=True, help="Stop string (repeatable, up to 4).")
@click.option("--json-schema", "json_schema", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON Schema file: every answer is JSON that follows it (constrained decoding).")
@click.option("--json", "json_object", is_flag=True, help="Every answer is a JSON object (no particular schema).")
@click.option("--recursive", "-r", is_flag=True, help="Include images in subfolders (named by relative path).")
@click.option("--chunk", type=click.IntRange(min=1), default=500, show_default=True,
              help="Files per server batch; a folder of 10,000 images becomes several batches.")
@click.option("--cancel-on-exit", is_flag=True,
              help="On Ctrl-C cancel the batch on the server (default: leave it running and resume it next time).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def batch(directory: Path, prompt: str, out: Path, server: str, api_key: str | None, temperature: float | None,
          max_tokens: int | None, min_tokens: int | None, top_p: float | None, top_k: int | None,
          repetition_penalty: float | None, seed: int | None, stop: tuple[str, ...], json_schema: Path | None,
          json_object: bool, recursive: bool, chunk: int, cancel_on_exit: bool, quiet: bool) -> None:
    """Describe every image in DIRECTORY; write one JSON line per image to --out.

    \b
    Images: png, jpg, jpeg, bmp, webp, gif (hidden files skipped), sorted by relative path, which is
    also each result's "name". Running the same command again skips files that already succeeded in
    --out, retries failed and cancelled ones, and picks up a batch left running by an interrupted run
    (recorded in <out>.state.json) instead of uploading it again.

    \b
    Exit codes: 0 every file succeeded; 1 some failed (see their "error"); 2 the run could not
    proceed (server unreachable, model not loaded, request refused); 130 interrupted.
    """
    if not prompt.strip():
        raise click.BadParameter("must not be blank", param_hint="--prompt")
    params = {"temperature": temperature, "max_tokens": max_tokens, "min_tokens": min_tokens, "top_p": top_p,
              "top_k": top_k, "repetition_penalty": repetition_penalty, "seed": seed}
    fields = [(name, str(value)) for name, value in params.items() if value is not None]
    fields += [("stop", value) for value in stop]
    response_format = _response_format(json_schema, json_object)
    if response_format is not None:
        fields.append(("response_format", json.dumps(response_format)))
    options = BatchOptions(directory=directory, prompt=prompt, out=out, params=fields, recursive=recursive,
                           chunk=chunk, cancel_on_exit=cancel_on_exit, quiet=quiet)
    sys.exit(BatchRun(options, Client(server, api_key)).run())


def _response_format(schema_file: Path | None, json_object: bool) -> dict | None:
    """Build the response_format for --json-schema or --json (the server checks that it compiles)."""
    if schema_file is not None and json_object:
        raise click.BadParameter("give --json-schema or --json, not both", param_hint="--json")
    if json_object:
        return {"type": "json_object"}
    if schema_file is None:
        return None
    try:
        schema = json.loads(schema_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{schema_file} is not JSON: {exc}", param_hint="--json-schema") from exc
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{schema_file} must hold a JSON object", param_hint="--json-schema")
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", schema_file.stem)[:64] or "result"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@main.command()
@click.argument("batch_id")
@server_option
@api_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
def status(batch_id: str, server: str, api_key: str | None, as_json: bool) -> None:
    """Show a batch's progress."""
    batch = Client(server, api_key).batch(batch_id)
    if as_json:
        click.echo(json.dumps(batch, indent=2))
        return
    counts = batch.get("counts", {})
    detail = ", ".join(f"{name} {counts.get(name, 0)}" for name in
                       ("queued", "running", "succeeded", "failed", "cancelled"))
    click.echo(f"{batch['batch_id']}: {batch['status']}, {batch.get('progress', 0):.0%} of {batch.get('total')} "
               f"items final ({detail})")


@main.command()
@click.argument("batch_id")
@server_option
@api_key_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "json"]), default="jsonl", show_default=True)
def results(batch_id: str, server: str, api_key: str | None, fmt: str) -> None:
    """Print a batch's results, in input order, on stdout."""
    with Client(server, api_key).raw_results(batch_id, fmt) as response:
        for block in response.iter_content(64 * 1024):
            sys.stdout.buffer.write(block)
    sys.stdout.flush()


@main.command()
@click.argument("batch_id")
@server_option
@api_key_option
def cancel(batch_id: str, server: str, api_key: str | None) -> None:
    """Cancel the items of a batch that have not run yet."""
    batch = Client(server, api_key).cancel(batch_id)
    counts = batch.get("counts", {})
    click.echo(f"{batch['batch_id']}: {batch['status']} ({counts.get('succeeded', 0)} succeeded, "
               f"{counts.get('cancelled', 0)} cancelled, {counts.get('running', 0)} still stopping)")
