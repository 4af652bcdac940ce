"""The systems bench.peer compares: vlgate's stack, `transformers serve`, and `model.generate` in process.

Each takes the same N image+prompt requests at once and reports, per request, its latency, time to first token,
token counts and text.
"""

from __future__ import annotations

import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import requests
import torch
from PIL import Image

from bench import service
from bench.peer_venv import PeerVenv
from devtools import live
from devtools.databases import make_image

PROMPTS = ["Describe this picture.", "What colour is the background?", "Is there any text in this image?",
           "Write one sentence about this image."]


@dataclass
class Workload:
    """What every system gets: one PNG, prompts taken in turn, a token budget, greedy decoding."""

    tokens: int
    png: bytes = make_image((96, 64), (20, 120, 220))

    @property
    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png)).convert("RGB")

    def prompt(self, i: int) -> str:
        return PROMPTS[i % len(PROMPTS)]


@dataclass
class Reply:
    """One request's outcome; times in seconds from when it was sent (all N are sent at once)."""

    prompt: str
    latency_s: float
    ttft_s: float
    completion_tokens: int
    prompt_tokens: int
    text: str


@dataclass
class Round:
    """N requests sent together to one system: the wall time until the last finished, and every reply."""

    system: str
    n: int
    wall_s: float
    replies: list[Reply]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.replies) / self.wall_s


class OpenAIServer:
    """A server with an OpenAI-compatible /v1/chat/completions, driven by the official client, streaming."""

    name = "?"

    def __init__(self, base_url: str, model: str) -> None:
        self.base_url, self.model = base_url, model
        self.client: openai.OpenAI | None = None

    def connect(self) -> None:
        """Make one client (thread-safe, pooled) for every round."""
        limits = openai.DefaultHttpxClient(timeout=900)
        self.client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, http_client=limits)

    def ask(self, workload: Workload, i: int) -> Reply:
        """Send request ``i`` and stream its answer."""
        assert self.client is not None
        prompt = workload.prompt(i)
        content = [{"type": "image_url", "image_url": {"url": workload.data_url}}, {"type": "text", "text": prompt}]
        start, first, parts, usage = time.perf_counter(), None, [], None
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], temperature=0,
            max_tokens=workload.tokens, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        end = time.perf_counter()
        if usage is None or first is None:
            raise RuntimeError(f"{self.name}: request {i} streamed no {'usage' if first else 'token'}")
        return Reply(prompt, end - start, first - start, usage.completion_tokens, usage.prompt_tokens, "".join(parts))

    def run(self, workload: Workload, n: int) -> Round:
        """Send ``n`` requests at once from ``n`` threads; wait for all."""
        with ThreadPoolExecutor(n) as pool:
            start = time.perf_counter()
            replies = list(pool.map(lambda i: self.ask(workload, i), range(n)))
        return Round(self.name, n, time.perf_counter() - start, replies)


class Vlgate(OpenAIServer):
    """vlgate as deployed: gunicorn web, Redis, one Celery worker (bench.service's stack, production timings)."""

    name = "vlgate"

    def __init__(self, data_dir: Path, tmp: Path, caches: bool = False) -> None:
        self.stack, self.caches = service.Stack(data_dir, tmp, "sqlite"), caches
        if not caches:  # the peers encode every image and prefill every prompt: so does vlgate, unless asked
            for process in self.stack.services[1:]:
                process.env.update(VLGATE_VISION_CACHE_MB="0", VLGATE_PREFIX_CACHE_MB="0")
        super().__init__(self.stack.base, "demo")

    def start(self) -> None:
        self.stack.start()
        self.connect()

    def stop(self) -> None:
        self.stack.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log()}" for s in self.stack.services)

    def describe(self) -> str:
        argv = self.stack.services[1].argv  # whatever devtools.live runs the web with (worker class, threads)
        web = " ".join(a for a in argv[1:] if not a.startswith(("127.0.0.1:", "web:")) and a != "-b")
        caches = "on" if self.caches else "off (VLGATE_VISION_CACHE_MB=0, VLGATE_PREFIX_CACHE_MB=0)"
        return (f"gunicorn {web} + Redis + 1 Celery worker (solo pool, default MAX_BATCH/CHAT_RESERVE), sqlite; "
                f"vision and prefix caches {caches}; project .venv: "
                f"torch {_version('torch')}, transformers {_version('transformers')}")


class TransformersServe(OpenAIServer):
    """`transformers serve <checkpoint dir>` from the peer venv, pinned to the demo checkpoint."""

    def __init__(self, venv: PeerVenv, checkpoint: Path, tmp: Path, continuous_batching: bool) -> None:
        port = live.free_port()
        super().__init__(f"http://127.0.0.1:{port}", str(checkpoint))
        self.venv, self.continuous_batching = venv, continuous_batching
        self.name = "transformers serve" + (" --continuous-batching" if continuous_batching else "")
        argv = [str(venv.transformers_cli), "serve", str(checkpoint), "--device", "cpu", "--dtype", "float32",
                "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--continuous-batching"] if continuous_batching else []
        # The same one compute thread as vlgate's worker and the in-process column; offline like everything here.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
        env = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        self.process = live.Service(f"peer-{port}", argv, env, tmp)

    def start(self) -> None:
        self.process.start()
        live.wait_until(self._healthy, 180, 0.3, f"{self.name} to load the checkpoint")
        self.connect()

    def _healthy(self) -> bool:
        if not self.process.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.process.log()}")
        return requests.get(f"{self.base_url}/health", timeout=2).ok

    def stop(self) -> None:
        self.process.stop()

    def logs(self) -> str:
        return f"--- {self.name}\n{self.process.log()}"

    def fell_back(self) -> bool:
        """Tell whether the server logged that it does not batch this model (sequential generation instead)."""
        return "does not support continuous batching" in self.process.log_path.read_text(errors="replace")

    def describe(self) -> str:
        v, flags = self.venv.versions, " ".join(self.process.argv[3:])
        return (f"transformers serve <checkpoint> {flags}, OMP_NUM_THREADS=1; its own "
                f"venv {self.venv.path} ({'built in this run' if self.venv.built_now else 'reused'}): torch "
                f"{v['torch']}, torchvision {v['torchvision']}, transformers[serving] {v['transformers']}")


class FirstToken:
    """A generate() streamer that notes when the first generated token comes (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, _: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class InProcess:
    """The original tutorial: AutoModelForImageTextToText + processor, ``model.generate`` one request at a time."""

    name = "in process, model.generate one at a time"

    def __init__(self, checkpoint: Path, min_pixels: int, max_pixels: int) -> None:
        self.checkpoint, self.pixels = checkpoint, (min_pixels, max_pixels)
        self.model: Any = None
        self.processor: Any = None
        self.threads = torch.get_num_threads()

    def start(self) -> None:
        from transformers import AutoModelForImageTextToText

        from worker.processor import load_processor

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the worker's OMP_NUM_THREADS=1: compare like with like
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.checkpoint, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True).eval()
        self.processor = load_processor(str(self.checkpoint), min_pixels=self.pixels[0], max_pixels=self.pixels[1],
                                        local_only=True)

    def stop(self) -> None:
        self.model = None
        torch.set_num_threads(self.threads)

    def logs(self) -> str:
        return ""

    def describe(self) -> str:
        return (f"this process (project .venv: torch {torch.__version__}, transformers {_version('transformers')}), "
                "1 torch thread, processor from worker/processor.py load_processor")

    @torch.inference_mode()
    def answer(self, workload: Workload, i: int, sent: float) -> Reply:
        """Prepare and generate request ``i`` greedily; times count from ``sent`` (it waited for the ones before)."""
        prompt = workload.prompt(i)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[workload.image()], return_tensors="pt")
        first = FirstToken()
        out = self.model.generate(**inputs, max_new_tokens=workload.tokens, do_sample=False, streamer=first)
        end, size = time.perf_counter(), inputs["input_ids"].shape[1]
        new = out[0, size:]
        words = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        return Reply(prompt, end - sent, (first.at or end) - sent, len(new), size, words)

    def run(self, workload: Workload, n: int) -> Round:
        """All ``n`` requests arrive at once; serve them in order, one ``generate`` after another."""
        start = time.perf_counter()
        replies = [self.answer(workload, i, start) for i in range(n)]
        return Round(self.name, n, time.perf_counter() - start, replies)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
