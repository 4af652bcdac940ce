"""``vlgate batch``: upload a folder in chunks, follow each batch, append results as items finish, resume when rerun."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from vlgate_cli.client import ApiFailure, Client, CliError, Unreachable
from vlgate_cli.multipart import CONTENT_TYPES, FilePart, MultipartBody
from vlgate_cli.outfile import FINAL_STATUSES, InFlight, ResultsFile, exclusive

POLL_S = 0.5
MODEL_WAIT_S = 600.0  # how long to wait for a worker that is still loading the model
OUTAGE_S = 120.0  # how long following a batch tolerates a server that stopped answering
CANCEL_SETTLE_S = 10.0  # after a cancel, how long to wait for running items to stop
INTERRUPTED = 130  # the shell's code for "ended by Ctrl-C"


@dataclass(frozen=True)
class BatchOptions:
    """What the user asked for on the command line."""

    directory: Path
    prompt: str
    out: Path
    params: list[tuple[str, str]]  # form fields sent after the prompt, e.g. ("temperature", "0.2")
    recursive: bool = False
    chunk: int = 500
    cancel_on_exit: bool = False
    quiet: bool = False


def command_name() -> str:
    """Return how the user started us (``vlgate`` or ``python -m vlgate_cli``), for hints they can paste."""
    context = click.get_current_context(silent=True)
    return context.find_root().info_name if context and context.find_root().info_name else "vlgate"


def list_images(directory: Path, recursive: bool) -> list[FilePart]:
    """Return the image files in ``directory``, named by relative path and sorted; hidden files are skipped."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        for name in names:
            path = Path(root, name)
            if name.startswith(".") or path.suffix.lower() not in CONTENT_TYPES or not path.is_file():
                continue
            found.append(FilePart(path.relative_to(directory).as_posix(), path, path.stat().st_size))
    return sorted(found, key=lambda part: part.name)


def say(message: str) -> None:
    """Print a line on stderr without tearing the progress bars."""
    tqdm.write(message, file=sys.stderr)


class BatchRun:
    """One invocation: resume the recorded batch if any, then upload and follow the remaining chunks."""

    def __init__(self, options: BatchOptions, client: Client) -> None:
        self.options = options
        self.client = client
        self.results = ResultsFile(options.out)
        self.outcomes: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.bar: tqdm | None = None
        self.done = 0  # items of the batches already finished in this run (the bar's base)
        self.written: set[str] = set()  # names of the followed batch already appended to the results file

    def run(self) -> int:
        """Do the whole job; return the exit code (0 all succeeded, 1 some did not, 130 interrupted)."""
        opts = self.options
        files = list_images(opts.directory, opts.recursive)
        if not files:
            hint = "" if opts.recursive else " (--recursive includes subfolders)"
            raise CliError(f"no image files ({', '.join(sorted(CONTENT_TYPES))}) in {opts.directory}{hint}")
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(opts.out) as ours:
            if not ours:
                raise CliError(f"another vlgate run is writing {opts.out}; let it finish (or stop it) first")
            self.results = ResultsFile.load(opts.out)
            return self._run(files)

    def _run(self, files: list[FilePart]) -> int:
        """Follow the recorded batch if any, then upload and follow the missing files chunk by chunk."""
        opts = self.options
        flight = self._recorded_flight()
        in_flight = set(flight.names) if flight else set()
        done = self.results.succeeded()
        pending = [f for f in files if f.name not in done and f.name not in in_flight]
        chunks = [pending[i:i + opts.chunk] for i in range(0, len(pending), opts.chunk)]
        self._announce(files, pending, chunks, flight)
        if not pending and not flight:
            return 0
        if pending:
            self._wait_for_model()
        total = len(pending) + (len(flight.names) if flight else 0)
        self.bar = progress_bar(total, flight.final if flight else 0, opts.quiet)
        interrupted = False
        try:
            if flight:
                self._finish(flight)
            for number, chunk in enumerate(chunks, 1):
                self.bar.set_description(f"chunk {number}/{len(chunks)}")
                self._finish(self._upload(chunk, number, len(chunks)))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.bar.close()
            self.bar = None
        return self._interrupted() if interrupted else self._summary(files)

    def _recorded_flight(self) -> InFlight | None:
        """Return the batch an interrupted run left in flight, if it still exists on this server."""
        flight = InFlight.load(self.options.out)
        if flight is None:
            return None
        state = InFlight.path_for(self.options.out)
        if flight.server != self.client.base:
            raise CliError(f"{state} records batch {flight.batch_id} on {flight.server}, not {self.client.base}: "
                           f"pass --server {flight.server} to collect it, or delete {state}")
        try:
            batch = self.client.batch(flight.batch_id)
        except ApiFailure as failure:
            if failure.status != 404:
                raise
            say(f"Batch {flight.batch_id} recorded in {state} no longer exists on the server; "
                "its files will be uploaded again.")
            InFlight.clear(self.options.out)
            return None
        if flight.prompt != self.options.prompt:
            say(f"Note: batch {flight.batch_id} was started with a different prompt ({flight.prompt!r}); "
                "following it anyway (delete the state file to drop it).")
        # What finished before this run is not this run's speed: the bar starts there (tqdm's `initial`).
        flight.final = sum((batch.get("counts") or {}).get(status, 0) for status in FINAL_STATUSES)
        return flight

    def _announce(self, files: list[FilePart], pending: list[FilePart], chunks: list[list[FilePart]],
                  flight: InFlight | None) -> None:
        """Say what this run will do before it does it."""
        opts = self.options
        skipped = len(files) - len(pending) - (len({f.name for f in files} & set(flight.names)) if flight else 0)
        parts = [f"{len(files)} image files in {opts.directory}"]
        if skipped:
            parts.append(f"{skipped} already succeeded in {opts.out}")
        if flight:
            parts.append(f"resuming batch {flight.batch_id} ({len(flight.names)} items) instead of uploading it again")
        if pending:
            parts.append(f"{len(pending)} to upload in {len(chunks)} batch{'es' if len(chunks) > 1 else ''}")
        elif not flight:
            parts.append("nothing to upload")
        say("; ".join(parts) + ".")

    def _wait_for_model(self) -> None:
        """Fail before uploading anything if no worker can serve the model (waiting for one that is loading)."""
        deadline = time.monotonic() + MODEL_WAIT_S
        waiting = False
        while True:
            health = self.client.health()
            if health.get("model_ready"):
                return
            if health.get("status") == "down":
                broken = [f"{name}: {health[name].get('error')}" for name in ("database", "redis")
                          if not (health.get(name) or {}).get("ok", True)]
                raise CliError(f"service_unavailable: the server is down ({'; '.join(broken) or 'see /api/health'})")
            if "workers" not in health:  # a key that is not an admin's sees the status only: just wait
                if time.monotonic() > deadline:
                    raise CliError("model_not_loaded: the server's model is not ready (an admin key sees why in "
                                   "/api/health)")
                time.sleep(2)
                continue
            workers = health.get("workers") or []
            loading = [w.get("worker_id", "?") for w in workers if w.get("state") == "loading"]
            if not loading or time.monotonic() > deadline:
                raise CliError(f"model_not_loaded: the model is not loaded: {_not_loaded_reason(workers)}")
            if not waiting:
                say(f"Waiting for {', '.join(loading)} to load the model…")
                waiting = True
            time.sleep(2)

    def _upload(self, chunk: list[FilePart], number: int, count: int) -> InFlight:
        """Stream one chunk to ``POST /api/batches`` and record the new batch before following it."""
        opts = self.options
        body = MultipartBody([("prompt", opts.prompt), *opts.params], chunk)
        with tqdm(total=len(body), unit="B", unit_scale=True, unit_divisor=1024, leave=False, position=1,
                  desc=f"upload {number}/{count}", disable=opts.quiet, file=sys.stderr) as upload_bar:
            body.on_bytes = upload_bar.update
            batch = self.client.create_batch(body)
        flight = InFlight(self.client.base, batch["batch_id"], [part.name for part in chunk], opts.prompt)
        flight.save(opts.out)
        if batch.get("total") != len(chunk):
            say(f"Warning: sent {len(chunk)} files but batch {flight.batch_id} has {batch.get('total')} items.")
        return flight

    def _finish(self, flight: InFlight) -> None:
        """Follow a batch to its end, appending each item's result as it finishes, then forget it."""
        assert self.bar is not None
        self._follow(flight, self.done)
        self._collect(flight)
        self.done += len(flight.names)
        self.bar.n = self.done
        self.bar.refresh()

    def _follow(self, flight: InFlight, base: int, settle_s: float | None = None) -> dict[str, Any]:
        """Poll the batch until no item is queued or running (or, after a cancel, until settle_s passes)."""
        batch_id = flight.batch_id
        self.written = {name for name in flight.names if self.results.latest.get(name, {}).get("batch_id") == batch_id}
        seen = len(self.written)
        outage_since: float | None = None
        started = time.monotonic()
        while True:
            try:
                batch = self.client.batch(batch_id)
                outage_since = None
            except (Unreachable, ApiFailure) as exc:
                if isinstance(exc, ApiFailure) and exc.status < 500:
                    raise
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > OUTAGE_S:
                    raise CliError(f"{exc.message} (for {OUTAGE_S:.0f} s); the batch is recorded in "
                                   f"{InFlight.path_for(self.options.out)}: run again to resume") from exc
                time.sleep(2)
                continue
            counts = batch.get("counts") or {}
            final = sum(counts.get(status, 0) for status in FINAL_STATUSES)
            if final > seen:  # some items finished since the last look: write them now, not at the batch's end
                self._collect(flight, clear=False)
                seen = final
            if self.bar is not None:
                self.bar.n = base + final
                self.bar.set_postfix(failed=self.outcomes["failed"] + counts.get("failed", 0), refresh=False)
                self.bar.refresh()
            if counts.get("queued", 0) + counts.get("running", 0) == 0:
                return batch
            if settle_s is not None and time.monotonic() - started > settle_s:
                return batch
            time.sleep(POLL_S)

    def _collect(self, flight: InFlight, clear: bool = True) -> None:
        """Append the batch's newly final items to the results file (each once); at the end clear the state file."""
        records = []
        for item in self.client.results(flight.batch_id):
            if item.get("status") not in FINAL_STATUSES:
                continue
            record = {**item, "batch_id": flight.batch_id}
            index = item.get("index")
            if isinstance(index, int) and 0 <= index < len(flight.names):
                # Our own name for the file: the server may shorten long names (255 characters at most).
                record["name"] = flight.names[index]
            if record.get("name") not in self.written:
                records.append(record)
        if records:
            self.results.append(records)
        for record in records:
            self.written.add(record["name"])
            self.outcomes[record["status"]] += 1
            if record.get("error"):
                self.error_codes[record["error"].get("code", "?")] += 1
        if clear:
            InFlight.clear(self.options.out)

    def _interrupted(self) -> int:
        """Ctrl-C: leave the batch running on the server (default) or cancel it and keep what finished."""
        flight = InFlight.load(self.options.out)  # the state file, not a variable, says what the server has
        if flight is None:
            say("Interrupted before the server accepted the chunk being uploaded: nothing of it was recorded, "
                "and it will be uploaded again next run.")
            return INTERRUPTED
        state = InFlight.path_for(self.options.out)
        if not self.options.cancel_on_exit:
            say(f"Interrupted. Batch {flight.batch_id} keeps running on the server (recorded in {state}). "
                "Run the same command again to follow it and write its results, or stop it with "
                f"`{command_name()} cancel {flight.batch_id} --server {self.client.base}`.")
            return INTERRUPTED
        try:
            say(f"Interrupted: cancelling batch {flight.batch_id}…")
            self.client.cancel(flight.batch_id)
            self._follow(flight, 0, settle_s=CANCEL_SETTLE_S)
            self._collect(flight)
        except KeyboardInterrupt:
            say(f"Stopped; batch {flight.batch_id} stays recorded in {state}.")
            return INTERRUPTED
        say(f"Cancelled batch {flight.batch_id}; its finished items are in {self.options.out}, "
            "the rest will be uploaded again next run.")
        return INTERRUPTED

    def _summary(self, files: list[FilePart]) -> int:
        """Tidy the results file, say how the run went, and choose the exit code."""
        self.results.compact()
        written = sum(self.outcomes.values())
        detail = ", ".join(f"{self.outcomes[status]} {status}" for status in FINAL_STATUSES if self.outcomes[status])
        if self.error_codes:
            detail += "; errors: " + ", ".join(f"{code} ×{n}" for code, n in self.error_codes.most_common())
        say(f"Wrote {written} result{'' if written == 1 else 's'} ({detail or 'none'}) to {self.options.out}.")
        succeeded = self.results.succeeded()
        missing = [f.name for f in files if f.name not in succeeded]
        if missing:
            say(f"{len(missing)} of {len(files)} files have no successful result yet "
                f"(e.g. {', '.join(missing[:3])}); run the same command again to retry them.")
            return 1
        return 0


def progress_bar(total: int, already: int, quiet: bool) -> tqdm:
    """Make the items bar; ``already`` (finished before this run) counts towards the bar but not the rate."""
    return tqdm(total=total, initial=already, unit="img", desc="batch", disable=quiet, file=sys.stderr,
                dynamic_ncols=True)


def _not_loaded_reason(workers: list[dict[str, Any]]) -> str:
    """Explain from the health report's workers why none can serve the model."""
    if not workers:
        return "no worker is running"
    return "; ".join(
        f"worker {w.get('worker_id')}: {w.get('error') or w.get('state')}" for w in workers
    )
