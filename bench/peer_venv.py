"""Build (once) the peer's own virtual environment: torch, torchvision and transformers[serving], outside .venv.

``transformers serve`` needs torchvision (Qwen3-VL's processor has a video half), which vlgate must never depend
on, so the peer lives in a separate venv. It is reused while its marker file names the same versions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DEFAULT_DIR = Path("~/.cache/vlgate/peer-venv").expanduser()
PEER_TORCH = "2.14.1"  # the newest CUDA build on this machine's local index (it runs on the CPU too)
PEER_TORCHVISION = "0.29.1"
MARKER = "vlgate-peer.json"


@dataclass
class PeerVenv:
    """A ready peer venv: where it is, its versions, and whether this run built it."""

    path: Path
    versions: dict[str, str]
    built_now: bool

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def transformers_cli(self) -> Path:
        return self.path / "bin" / "transformers"


class PeerVenvError(RuntimeError):
    """The peer venv could not be built or is broken; the message says why."""


def project_transformers() -> str:
    """Return the transformers version vlgate pins (and runs): the peer gets exactly the same one."""
    return metadata.version("transformers")


def wanted() -> dict[str, str]:
    """Return the versions the peer venv must hold."""
    return {"torch": PEER_TORCH, "torchvision": PEER_TORCHVISION, "transformers": project_transformers()}


def _run(argv: list[str], log: Path, what: str) -> None:
    """Run one build step, appending its output to ``log``; raise PeerVenvError naming the step if it fails."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = log.read_text(errors="replace")[-1500:]
        raise PeerVenvError(f"{what} failed (exit {done.returncode}); log {log}:\n{tail}")


def installed_versions(python: Path) -> dict[str, str]:
    """Ask the venv's own interpreter which torch, torchvision and transformers it has."""
    code = ("import json; from importlib.metadata import version as v; "
            "print(json.dumps({p: v(p) for p in ('torch', 'torchvision', 'transformers')}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise PeerVenvError(f"{python} cannot report its versions: {done.stderr[-500:]}")
    return json.loads(done.stdout)


def ensure_peer_venv(path: Path = DEFAULT_DIR, say=print) -> PeerVenv:  # type: ignore[no-untyped-def]
    """Return the peer venv at ``path``, building it first unless its marker names the wanted versions."""
    path = path.expanduser().resolve()
    marker, want = path / MARKER, wanted()
    if marker.exists() and json.loads(marker.read_text()) == want and (path / "bin" / "transformers").exists():
        return PeerVenv(path, installed_versions(path / "bin" / "python"), built_now=False)
    try:
        return _build(path, want, say)
    except OSError as exc:  # disk full, a read-only or missing parent: say so instead of failing the whole bench
        raise PeerVenvError(f"cannot build the peer venv in {path}: {exc}") from exc


def _build(path: Path, want: dict[str, str], say) -> PeerVenv:  # type: ignore[no-untyped-def]
    """Create the venv, install the pinned torch and torchvision, then transformers[serving]; write the marker."""
    marker = path / MARKER
    say(f"building the peer venv in {path} (once; torch {PEER_TORCH} is a ~5.5 GB CUDA build from local wheels, "
        "this takes several minutes)")
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.parent / f"{path.name}-build.log"
    log.write_text("")
    marker.unlink(missing_ok=True)
    constraints = path.parent / f"{path.name}-constraints.txt"
    # pip must never swap the torch it just installed for another one when transformers[serving] resolves.
    constraints.write_text(f"torch=={PEER_TORCH}\ntorchvision=={PEER_TORCHVISION}\n")
    pip = [str(path / "bin" / "pip"), "install", "--disable-pip-version-check", "-c", str(constraints)]
    if not (path / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(path)], log, "python -m venv")
    _run([*pip, f"torch=={PEER_TORCH}", f"torchvision=={PEER_TORCHVISION}"], log, "pip install torch torchvision")
    _run([*pip, f"transformers[serving]=={want['transformers']}"], log, "pip install transformers[serving]")
    have = installed_versions(path / "bin" / "python")
    if have != want:
        raise PeerVenvError(f"the peer venv holds {have}, not {want}; log {log}")
    marker.write_text(json.dumps(want))
    return PeerVenv(path, have, built_now=True)
