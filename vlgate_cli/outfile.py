"""The results file (JSONL, one item per line) and its sidecar state file (the batch still in flight)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FINAL_STATUSES = ("succeeded", "failed", "cancelled")


def _replace_atomically(path: Path, text: str) -> None:
    """Write a whole file so that a crash leaves either the old or the new version, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def exclusive(out: Path) -> Iterator[bool]:
    """Hold ``<out>.lock`` for the run; yield False if another run already holds it (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; run one client per results file
        yield True
        return
    lock = out.with_name(out.name + ".lock")
    with lock.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)


@dataclass
class ResultsFile:
    """The ``--out`` JSONL: appended as items finish; the last line for a name is that file's result."""

    path: Path
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # names, by first appearance
    lines: int = 0
    unreadable: int = 0

    @classmethod
    def load(cls, path: Path) -> ResultsFile:
        """Read what earlier runs wrote (a torn last line from a crash is skipped)."""
        results = cls(path)
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    results.unreadable += bool(line.strip())
                    continue
                if isinstance(record, dict) and isinstance(record.get("name"), str):
                    results._remember(record)
        return results

    def _remember(self, record: dict[str, Any]) -> None:
        name = record["name"]
        if name not in self.latest:
            self.order.append(name)
        self.latest[name] = record
        self.lines += 1

    def succeeded(self) -> set[str]:
        """Return the names whose latest result succeeded (those are never uploaded again)."""
        return {name for name, record in self.latest.items() if record.get("status") == "succeeded"}

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append results and flush them to disk before anything else happens."""
        with self.path.open("a+", encoding="utf-8") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":  # a torn line from a crash: start ours on a fresh one
                    handle.write("\n")
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                self._remember(record)
            handle.flush()
            os.fsync(handle.fileno())

    def compact(self) -> bool:
        """Keep one line per name (its latest result), in input order (by name); return True if rewritten.

        Lines are appended in the order items finish; a run that ends puts them back in the order of the files.
        """
        ordered = sorted(self.order)
        if self.lines == len(self.latest) and not self.unreadable and ordered == self.order:
            return False
        self.order = ordered
        text = "".join(json.dumps(self.latest[name], ensure_ascii=False) + "\n" for name in self.order)
        _replace_atomically(self.path, text)
        self.lines, self.unreadable = len(self.latest), 0
        return True


@dataclass
class InFlight:
    """The sidecar ``<out>.state.json``: the batch uploaded but not yet written to the results file."""

    server: str
    batch_id: str
    names: list[str]
    prompt: str
    created_at: str = ""
    final: int = 0  # items already final on the server when this run found the batch (not saved)

    @staticmethod
    def path_for(out: Path) -> Path:
        return out.with_name(out.name + ".state.json")

    @classmethod
    def load(cls, out: Path) -> InFlight | None:
        """Return the recorded batch, or None when there is none (or the file is unreadable)."""
        path = cls.path_for(out)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(data["server"], data["batch_id"], list(data["names"]), data.get("prompt", ""),
                       data.get("created_at", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, out: Path) -> None:
        """Record the batch so that an interrupted run follows it instead of uploading again."""
        self.created_at = self.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        body = {"server": self.server, "batch_id": self.batch_id, "prompt": self.prompt,
                "created_at": self.created_at, "names": self.names}
        _replace_atomically(self.path_for(out), json.dumps(body, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def clear(cls, out: Path) -> None:
        cls.path_for(out).unlink(missing_ok=True)
