"""Measure the caches: time to first token late in an image conversation, and a batch asking several
questions of each image, with the vision-encoder and session prefix caches on versus off, in one run."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import click
import torch
from PIL import Image

from common.config import Settings
from worker.engine import Engine, GenerationRequest, Turn
from worker.sampling import SamplingParams

MB = 2**20
QUESTIONS = ["What is the product?", "What colour is it?", "Is there any text on it?", "Describe the background."]


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """Return a noisy photo-sized picture, different for every seed (so the processor cannot shortcut it)."""
    rng = random.Random(seed)
    small = Image.frombytes("RGB", (size[0] // 8, size[1] // 8), rng.randbytes(size[0] // 8 * size[1] // 8 * 3))
    return small.resize(size, Image.Resampling.BILINEAR)


def conversation_ttft(cached: Engine, plain: Engine, turns: int, tokens: int, size: tuple[int, int],
                      repeats: int) -> tuple[list[float], list[float], int, int, bool]:
    """Play a conversation on both engines; return the last turn's prefill times (on, off), its prompt and cached
    tokens, and whether every answer matched."""
    greedy = SamplingParams(temperature=0, max_tokens=tokens)
    history: dict[str, list[Turn]] = {"on": [], "off": []}
    same = True
    for t in range(turns - 1):
        images = [photo(t, size)] if t in (0, 2) else []
        answers = {}
        for name, engine in (("on", cached), ("off", plain)):
            history[name].append(Turn("user", f"Question {t}: tell me about it.", images, [f"img_{t}"] * len(images)))
            on = name == "on"
            request = GenerationRequest(f"t{t}", list(history[name]), greedy, cache_key="bench:s" if on else None,
                                        keep_key=(lambda _answer: "bench:s") if on else None)
            answers[name] = engine.generate([request])[0].text
            history[name].append(Turn("assistant", answers[name]))
        same = same and answers["on"] == answers["off"]
    first_token = SamplingParams(temperature=0, max_tokens=1)
    times: dict[str, list[float]] = {"on": [], "off": []}
    cached_tokens = prompt_tokens = 0
    for r in range(repeats):
        for name, engine in ((("on", cached), ("off", plain)) if r % 2 == 0 else (("off", plain), ("on", cached))):
            turn = [*history[name], Turn("user", "And finally: which one is better?")]
            request = GenerationRequest("last", turn, first_token, cache_key="bench:s" if name == "on" else None)
            start = time.perf_counter()
            result = engine.generate([request])[0]
            times[name].append(time.perf_counter() - start)
            if name == "on":
                cached_tokens, prompt_tokens = result.cached_tokens, result.prompt_tokens
    return times["on"], times["off"], prompt_tokens, cached_tokens, same


def questions_batch(cached: Engine, plain: Engine, images: list[Image.Image], tokens: int,
                    batch: int) -> tuple[float, float, bool]:
    """Ask every question of every image (image by image, as a batch file would), ``batch`` rows at a time, on
    both engines in turn, chunk by chunk (so a busy machine slows both alike); return (on s, off s, same)."""
    greedy = SamplingParams(temperature=0, max_tokens=tokens)
    requests = [GenerationRequest(f"i{i}q{q}", [Turn("user", question, [image], [f"img_{i}"])], greedy)
                for i, image in enumerate(images) for q, question in enumerate(QUESTIONS)]
    spent = {"on": 0.0, "off": 0.0}
    same = True
    for n, at in enumerate(range(0, len(requests), batch)):
        chunk, answers = requests[at:at + batch], {}
        sides = [("on", cached), ("off", plain)]
        for name, engine in sides if n % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            answers[name] = [r.text for r in engine.generate(chunk)]
            spent[name] += time.perf_counter() - start
        same = same and answers["on"] == answers["off"]
    return spent["on"], spent["off"], same


@click.command()
@click.option("--shape", type=click.Choice(["demo", "mid"]), default="demo", show_default=True,
              help="Random-weight checkpoint (worker/shapes.py).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir with the checkpoints.")
@click.option("--turns", default=5, show_default=True, help="Turn whose time to first token is measured.")
@click.option("--images", default=50, show_default=True, help="Images in the batch (4 questions each).")
@click.option("--tokens", default=16, show_default=True, help="Answer length in the conversation and the batch.")
@click.option("--batch", default=8, show_default=True, help="Rows decoded together in the batch run.")
@click.option("--size", default="640x480", show_default=True, help="Image size, WxH.")
@click.option("--repeats", default=5, show_default=True, help="Timed last turns per side, alternating.")
def main(shape: str, data_dir: Path | None, turns: int, images: int, tokens: int, batch: int, size: str,
         repeats: int) -> None:
    """Print cache on/off ratios measured side by side in one run."""
    from worker.loader import load_engine
    from worker.shapes import ensure_shaped_checkpoint

    settings = Settings(model="demo", device="cpu", hf_offline=True, **({"data_dir": data_dir} if data_dir else {}))
    if shape != "demo":
        settings = settings.model_copy(update={"model": str(ensure_shaped_checkpoint(settings.demo_dir, shape))})
    loaded = load_engine(settings)
    cached = Engine(loaded.model, loaded.processor, loaded.info, vision_cache_bytes=1024 * MB,
                    prefix_cache_bytes=1024 * MB)
    plain = Engine(loaded.model, loaded.processor, loaded.info)
    width, height = (int(x) for x in size.split("x"))
    print(f"model: {loaded.info.label}\ndevice: {loaded.info.device}  torch threads: {torch.get_num_threads()}  "
          f"images {width}x{height}, greedy")

    on, off, prompt, cached_tokens, same = conversation_ttft(cached, plain, turns, tokens, (width, height), repeats)
    print(f"\n1. Time to first token at turn {turns} of an image conversation ({prompt} prompt tokens; "
          f"{cached_tokens} from the session's prefix cache), median of {repeats} per side, alternating")
    print(f"   cache on  {statistics.median(on) * 1e3:8.1f} ms\n   cache off {statistics.median(off) * 1e3:8.1f} ms")
    print(f"   off/on = {statistics.median(off) / statistics.median(on):.2f}x faster with the cache; "
          f"answers of turns 1-{turns - 1} identical: {'yes' if same else 'NO'}")

    pictures = [photo(1000 + i, (width, height)) for i in range(images)]
    questions_batch(cached, plain, pictures[:1], tokens, batch)  # warm both paths once (first-call costs)
    cached.vision = type(cached.vision)(1024 * MB)
    on_s, off_s, same = questions_batch(cached, plain, pictures, tokens, batch)
    n = len(pictures) * len(QUESTIONS)
    print(f"\n2. A batch of {len(QUESTIONS)} questions x {images} images ({n} items, {tokens} tokens each, "
          f"{batch} rows at a time, the two sides in turn chunk by chunk)")
    print(f"   cache on  {on_s:6.1f} s  {n / on_s:6.1f} items/s  vision tower runs: {cached.vision.misses} "
          f"(hits {cached.vision.hits})")
    print(f"   cache off {off_s:6.1f} s  {n / off_s:6.1f} items/s  vision tower runs: {n}")
    print(f"   on/off throughput = {off_s / on_s:.2f}x; answers identical: {'yes' if same else 'NO'}")
    print("\nThe demo and mid shapes have a 2-layer vision tower; Qwen3-VL-4B's has 24 layers, 1024 wide, so its "
          "share of a prefill (and the cache's gain) is far larger there.")


if __name__ == "__main__":
    main()
