"""Load the configured model onto its device, falling back to the CPU or the demo checkpoint when told to."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.config import DEMO_MODEL, Settings
from worker.demo import checkpoint_label, ensure_demo_checkpoint, is_demo_checkpoint
from worker.engine import Engine, ModelInfo
from worker.processor import load_processor

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded on any device."""


def resolve_device(setting: str) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda' or 'cuda:N' into a device, choosing the GPU when one exists."""
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Pick bf16 on a GPU and fp32 on the CPU (bf16 prefill is several times slower on CPUs)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in _DTYPES:
        raise ValueError(f"unknown dtype {setting!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[setting]


def _load_on(path: str, device: torch.device, dtype: torch.dtype, settings: Settings):
    """Load model and processor from a hub id or directory with ``from_pretrained``."""
    from transformers import AutoModelForImageTextToText

    local_only = settings.hf_offline or Path(path).is_dir()
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=local_only
    )
    model = model.to(device).eval()
    processor = load_processor(
        path, min_pixels=settings.min_image_pixels, max_pixels=settings.max_image_pixels, local_only=local_only
    )
    return model, processor


def _load_with_device_fallback(path: str, settings: Settings) -> tuple[object, object, torch.device, str | None]:
    """Load on the configured device; if that is a GPU and it fails, load on the CPU and say why."""
    device = resolve_device(settings.device)
    try:
        model, processor = _load_on(path, device, resolve_dtype(settings.dtype, device), settings)
        return model, processor, device, None
    except Exception as exc:
        if device.type != "cuda":
            raise
        reason = f"loading on {device} failed: {type(exc).__name__}: {exc}"
        log.error("%s; falling back to the CPU", reason)
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        model, processor = _load_on(path, cpu, torch.float32, settings)
        return model, processor, cpu, reason


def load_engine(settings: Settings) -> Engine:
    """Load the engine for ``settings.model``; with demo fallback on, serve the demo model if it fails."""
    requested = settings.model
    fallback_reason = None
    try:
        path = str(ensure_demo_checkpoint(settings.demo_dir)) if requested == DEMO_MODEL else requested
        model, processor, device, device_reason = _load_with_device_fallback(path, settings)
    except Exception as exc:
        if not settings.demo_fallback or requested == DEMO_MODEL:
            raise ModelLoadError(f"could not load model {requested!r}: {type(exc).__name__}: {exc}") from exc
        fallback_reason = f"could not load {requested!r} ({type(exc).__name__}: {str(exc)[:300]})"
        log.error("!" * 72)
        log.error("%s -- SERVING THE DEMO CHECKPOINT INSTEAD: its answers are random text", fallback_reason)
        log.error("!" * 72)
        path = str(ensure_demo_checkpoint(settings.demo_dir))
        model, processor, device, device_reason = _load_with_device_fallback(path, settings)
    demo = is_demo_checkpoint(path)
    text_config = model.config.text_config
    info = ModelInfo(
        requested=requested,
        path=path,
        label=checkpoint_label(path) if demo else requested,
        is_demo=demo,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        max_context=int(text_config.max_position_embeddings),
        fallback_reason=fallback_reason,
        device_fallback_reason=device_reason,
    )
    log.info("model ready: %s on %s (%s, %d parameters)", info.label, info.device, info.dtype, info.parameters)
    return Engine(model, processor, info, vision_cache_bytes=int(settings.vision_cache_mb * 2**20),
                  prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20))
