"""The single settings object, read from the environment with the prefix ``VLGATE_``."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
DEMO_MODEL = "demo"
WINDOW = re.compile(r"[0-9]{1,6}[smhd]")  # a /v1 batch completion window: "24h", "30m", "10s", "7d"
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Settings(BaseSettings):
    """Every tunable of vlgate; no other module reads ``os.environ``."""

    model_config = SettingsConfigDict(env_prefix="VLGATE_", env_file=None, extra="ignore")

    # Model and device
    model: str = Field(DEFAULT_MODEL, description="Hub id, local path, or 'demo' (tiny random checkpoint).")
    demo_fallback: bool = Field(False, description="Serve the demo model, loudly labelled, if the real one fails.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda:N'.")
    dtype: str = Field("auto", description="'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float16', 'float32'.")
    hf_offline: bool = Field(False, description="Never reach the hub: load only local files and the cache.")

    # Storage and services
    data_dir: Path = Field(Path("data"), description="Database file, demo checkpoint cache, logs.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under data_dir.")
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Images
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Largest accepted encoded image.")
    max_image_pixels: int = Field(1024 * 1024, gt=0, description="Images are downscaled to at most this area.")
    min_image_pixels: int = Field(64 * 32 * 32, gt=0, description="Processor lower bound on image area.")
    max_images_per_request: int = Field(8, gt=0)
    low_detail_pixels: int = Field(448 * 448, gt=0, description="Pixel budget of an image sent with detail=low.")

    # Image URLs (/v1 image_url parts): fetched only from listed hosts, never from private addresses
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated hosts ('cdn.example.com', '*.example.com'); empty = none.")
    allowed_media_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated CIDRs that listed hosts may resolve to although private (an internal image "
                    "server); loopback, link-local and multicast stay refused unless named here.")
    media_fetch_timeout_s: float = Field(10.0, gt=0, description="Whole-fetch time limit for one image URL.")
    media_max_redirects: int = Field(3, ge=0, description="Redirects followed per image URL (each re-checked).")

    # Generation
    max_tokens_limit: int = Field(2048, gt=0)
    default_max_tokens: int = Field(512, gt=0)
    default_temperature: float = Field(0.5, ge=0.0, le=2.0)
    max_prompt_chars: int = Field(32_000, gt=0)
    max_batch: int | None = Field(None, gt=0, description="Cap on rows generated together; on a GPU the batch is "
                                  "sized from free memory and KV bytes per token up to it (worker/capacity.py). "
                                  "Default: 8 on the CPU, 256 on a GPU.")
    row_tokens: int = Field(4096, gt=0, description="KV-cache tokens budgeted per running row (prompt with "
                                                     "images plus answer) when sizing the batch on a GPU.")
    gpu_memory_margin: float = Field(0.1, ge=0, lt=1, description="Fraction of GPU memory kept free of KV "
                                                                  "cache when sizing the batch.")
    prepare_workers: int | None = Field(None, ge=0, description="Pool that prepares admitted jobs (images, chat "
                                        "template, processor) off the decode loop; 0: inline. Default: 1 on a GPU, 0 "
                                        "on the CPU (the decode loop's threads use every core: bench.prepare).")
    prepare_kind: str = Field("thread", pattern="^(thread|process)$", description="Threads (no start cost) or "
                              "processes (no GIL shared with the decode loop) for the prepare pool; bench.prepare.")
    chat_reserve: int = Field(4, ge=0, description="Extra rows kept for chat jobs when a batch fills max_batch.")
    vision_cache_mb: float = Field(512, ge=0, description="Vision-tower outputs kept per stored image (LRU, on the "
                                   "model's device): an image seen again skips the vision tower. 0 turns it off.")
    prefix_cache_mb: float = Field(2048, ge=0, description="KV caches kept per chat session (LRU, on the model's "
                                   "device): a session's next turn prefills only what is new. 0 turns it off.")
    admit_interval_s: float = Field(0.05, gt=0, description="How often a busy worker looks for jobs to admit.")
    admit_batch_rows: int = Field(4, gt=0, description="Most batch items admitted into a running batch at once.")
    task_budget_s: float = Field(120.0, gt=0, description="After this long one task stops admitting new jobs.")
    max_job_s: float = Field(600.0, gt=0, description="Wall-clock limit of one generation: a runaway row ends "
                                                      "with finish_reason 'time_limit'.")

    # Service behaviour
    heartbeat_s: float = Field(30.0, gt=0, description="Seconds between worker heartbeats.")
    liveness_ttl_s: float = Field(5.0, gt=1, description="A worker that has not renewed its liveness mark (every "
                                                         "second) for this long is dead: its jobs are re-queued.")
    chat_wait_s: float = Field(120.0, ge=0, description="How long POST /api/chat waits before answering 202.")
    model_wait_s: float = Field(5.0, ge=0, description="How long a request waits for a loaded worker before 503.")
    job_lease_s: float = Field(30.0, gt=0, description="A claimed job is re-claimable when its lease expires.")
    max_attempts: int = Field(3, gt=0, description="Claims per job before it fails with worker_lost.")
    reaper_interval_s: float = Field(3.0, gt=0, description="How often a worker looks for orphaned jobs.")
    upload_abandon_s: float = Field(600.0, gt=0, description="An upload that added no item for this long without "
                                                             "completing is deleted by the reaper.")
    stale_queued_s: float = Field(60.0, gt=0, description="A queued job older than this is re-enqueued if lost.")
    visibility_timeout_s: int = Field(3600, gt=0, description="Redis broker redelivery of unacked tasks.")
    worker_id: str | None = Field(None, description="Name shown in health; default host:pid.")
    load_retry_s: float = Field(30.0, gt=0, description="First wait before a failed model load is tried again.")
    service_wait_s: float = Field(120.0, gt=0, description="How long a worker waits for Redis/the database to "
                                                           "return after a blip before taking work again.")
    web_port: int = Field(8501, gt=0, lt=65536)
    gpus: str = Field("all", pattern=r"^\s*(?i:all|none|cpu|\d+(\s*,\s*\d+)*)\s*$",
                      description="GPUs that `make run` and the worker container start one worker each on: 'all' "
                                  "(every visible one), indices like '0,1', or 'none'/'cpu' (one CPU worker).")

    # Observability
    metrics_port: int | None = Field(9400, ge=0, lt=65536, description="Port of a worker's own /metrics "
                                                                      "(0 or empty: off); several workers on one "
                                                                      "host take the next free ports.")
    metrics_dir: Path | None = Field(None, description="prometheus-client's multi-process directory for the web's "
                                                       "gunicorn workers; default: DATA_DIR/metrics.")
    log_format: str = Field("text", pattern="^(text|json)$", description="'json': one JSON object per log line.")
    log_level: str = Field("INFO", description="Log level of vlgate's own loggers.")

    # Keys, tenants, quotas and the audit log (docs/security.md)
    auth: str = Field("auto", pattern="^(auto|required)$",
                      description="'auto': open while no key exists and the web binds only to loopback; keys "
                                  "required as soon as one exists or it binds elsewhere. 'required': always.")
    bind_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="Addresses the web listens on (gunicorn.conf.py fills it in from its bind).")
    admin_key: str | None = Field(None, description="Bootstrap admin secret (vlg_…): made into an admin key at "
                                                    "start-up if no key has it. Docker: from a secret file.")
    admin_key_file: Path | None = Field(None, description="A file holding the bootstrap admin secret.")
    key_cache_s: float = Field(1.0, ge=0, le=2, description="How long a key lookup is reused: a revoked key is "
                                                            "refused at most this long after.")
    auth_cookie_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="Life of the pages' login cookie.")
    ws_ticket_ttl_s: int = Field(30, gt=0, le=300, description="Life of a one-use WebSocket ticket.")
    max_queued_chat: int = Field(1000, gt=0, description="Chat jobs waiting at once before new ones get 503.")
    max_queued_batch_items: int = Field(100_000, gt=0, description="Batch items waiting at once before a new "
                                                                   "batch gets 503.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed to call the API from a browser.")
    log_dir: Path | None = Field(None, description="Where audit.log is written; default: DATA_DIR/logs.")
    audit_prompts: bool = Field(False, description="Write each prompt's text into the audit log (off: only its "
                                                   "length).")
    audit_max_bytes: int = Field(100 * 1024 * 1024, gt=0, description="audit.log is rotated when it reaches "
                                                                     "this size.")
    audit_backups: int = Field(10, ge=0, description="Rotated audit logs kept (audit.log.1 … .N); older ones are "
                                                     "deleted.")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses or CIDRs of reverse proxies whose X-Forwarded-For names the client "
                    "in the audit log; empty: the connecting address is the client.")
    environment: str = Field("development", pattern="^(development|production)$",
                             description="'production' refuses known default passwords in the database URL.")

    # OpenAI Batch API (/v1/files, /v1/batches; docs/openai.md "Batch API")
    files_dir: Path | None = Field(None, description="Where /v1 files are stored; default: DATA_DIR/files.")
    max_file_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Largest /v1/files upload.")
    batch_max_lines: int = Field(50_000, gt=0, description="Most requests in one /v1 batch input file.")
    batch_windows: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["24h"],
        description="Comma-separated completion windows /v1/batches accepts, each a number and s, m, h or d.")
    batch_lease_s: float = Field(30.0, gt=0, description="A web process validating or finishing a /v1 batch holds "
                                                         "it this long between renewals; one that died loses it.")
    batch_keeper_interval_s: float = Field(1.0, gt=0, description="How often each web process looks for /v1 "
                                                                  "batches to validate, finish or expire.")
    batch_validators: int = Field(2, gt=0, description="/v1 batches one web process validates at once.")
    batch_max_attempts: int = Field(3, gt=0, description="Validations of one /v1 batch before it fails (a file "
                                                         "that kills its validator is not retried forever).")

    # OpenAI-compatible API
    served_model_name: str | None = Field(None, description="The model id /v1 reports; default: VLGATE_MODEL.")
    max_choices: int = Field(4, gt=0, le=16, description="Largest `n` a /v1 request may ask for.")
    sse_keepalive_s: float = Field(10.0, gt=0, description="Comment lines on an SSE stream while the job waits.")

    @field_validator("allowed_media_domains", "allowed_media_networks", "bind_hosts", "cors_origins",
                     "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_media_networks", "trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        """Refuse a malformed CIDR at start-up rather than at the first image fetch."""
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("batch_windows", mode="before")
    @classmethod
    def _check_windows(cls, value: object) -> object:
        """Split the comma-separated list; refuse a window that is not a number of seconds, minutes, hours or days."""
        windows = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        for window in windows if isinstance(windows, list) else []:
            if not isinstance(window, str) or not WINDOW.fullmatch(window) or int(window[:-1]) == 0:
                raise ValueError(f"batch window {window!r}: use a number and s, m, h or d, like '24h'")
        return windows

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu") or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @property
    def sqlalchemy_url(self) -> str:
        """Return the database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'vlgate.db').resolve()}"

    @property
    def metrics_path(self) -> Path:
        """Return where the web's gunicorn workers keep their shared metric files."""
        return self.metrics_dir or self.data_dir / "metrics"

    @property
    def log_path(self) -> Path:
        """Return where the audit log lives."""
        return self.log_dir or self.data_dir / "logs"

    @property
    def files_path(self) -> Path:
        """Return where /v1 files are stored."""
        return self.files_dir or self.data_dir / "files"

    @property
    def demo_dir(self) -> Path:
        """Return where the demo checkpoint is cached."""
        return self.data_dir / "demo-checkpoint"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings read from the environment."""
    return Settings()
