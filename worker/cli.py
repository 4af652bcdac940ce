"""Command line for the engine: one-shot generation and building the demo checkpoint."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

import click

from common.config import get_settings
from common.images import ImageError, normalize_image


@click.group()
@click.option("--verbose", "-v", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """vlgate engine tools."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--prompt", required=True, help="The question to ask.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--temperature", default=None, type=click.FloatRange(0, 2))
@click.option("--max-tokens", default=None, type=click.IntRange(1))
@click.option("--seed", default=None, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of streaming text.")
def generate(prompt: str, images: tuple[Path, ...], temperature: float | None, max_tokens: int | None,
             seed: int | None, as_json: bool) -> None:
    """Load the configured model and answer one prompt, streaming the text."""
    from worker.engine import GenerationRequest, Turn
    from worker.loader import load_engine
    from worker.sampling import SamplingParams

    settings = get_settings()
    try:
        pictures = [normalize_image(p.read_bytes(), max_bytes=settings.max_image_bytes,
                                    max_pixels=settings.max_image_pixels).to_pil() for p in images]
    except ImageError as exc:
        raise click.ClickException(f"{exc.code}: {exc}") from exc
    engine = load_engine(settings)
    if engine.info.is_demo:
        click.secho(f"[model: {engine.info.label}]", fg="yellow", err=True)
        if engine.info.fallback_reason:
            click.secho(f"[{engine.info.fallback_reason}]", fg="yellow", err=True)
    params = SamplingParams(
        temperature=settings.default_temperature if temperature is None else temperature,
        max_tokens=max_tokens or settings.default_max_tokens,
        seed=seed,
    )
    request = GenerationRequest(uuid.uuid4().hex, [Turn("user", prompt, pictures)], params)
    on_delta = None if as_json else (lambda _rid, delta: (sys.stdout.write(delta), sys.stdout.flush()))
    result = engine.generate([request], on_delta=on_delta)[0]
    if as_json:
        click.echo(json.dumps({"response": result.text, "finish_reason": result.finish_reason,
                               "usage": result.usage, "timings": result.timings, "model": engine.info.label},
                              ensure_ascii=False))
    else:
        click.echo()
        click.secho(f"[{result.finish_reason}; {result.usage}]", fg="cyan", err=True)


@main.command("build-demo")
def build_demo() -> None:
    """Build (or find) the demo checkpoint and print its directory."""
    from worker.demo import ensure_demo_checkpoint

    click.echo(ensure_demo_checkpoint(get_settings().demo_dir))


if __name__ == "__main__":
    main()
