"""Settings of the serving process: listeners, models and engines, keys, limits, cache."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

EngineKind = Literal["auto", "vllm", "transformers", "remote"]


class ModelSettings(BaseModel):
    """One served model name and the engine behind it; `fallbacks` are other model names tried in order."""

    name: str = Field(min_length=1, max_length=200)
    engine: EngineKind = "auto"
    path: str | None = Field(None, description="HF-format model directory (vllm, transformers)")
    url: str | None = Field(None, description="base URL of an OpenAI-compatible upstream, e.g. http://vllm:8000/v1")
    upstream_model: str | None = Field(None, description="model name to send upstream (default: name)")
    api_key: str | None = Field(None, description="bearer key for the upstream", repr=False)
    fallbacks: list[str] = Field(default_factory=list)
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(2.0, gt=0)
    max_connections: int = Field(256, ge=1)
    max_model_len: int = Field(2048, ge=16)
    dtype: str = "float32"
    # vLLM on CPU reserves this many GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); without it vLLM takes 92% of RAM.
    kv_cache_gib: int = Field(1, ge=1)
    max_loras: int = Field(4, ge=1, description="vllm: LoRA adapters in one batch (slots on the accelerator)")
    max_lora_rank: int = Field(16, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1, description="vllm: LoRA adapters cached in CPU memory "
                                      "(default: max_loaded_adapters; at least max_loras)")
    max_loaded_adapters: int = Field(32, ge=1, description="adapters an engine keeps loaded; beyond it the least "
                                     "recently used one is evicted and loads again on its next request")
    max_concurrency: int = Field(16, ge=1, description="transformers engine: requests admitted at once (rows "
                                 "of the running batch and those waiting for the next)")
    max_batch: int = Field(16, ge=1, description="transformers engine: rows in one batched generate (rows may "
                           "name different adapters)")
    batch_window_ms: float = Field(3.0, ge=0, le=1000, description="transformers engine: how long the oldest "
                                   "waiting request waits for others to batch with while the model is idle")

    @model_validator(mode="after")
    def _engine_has_what_it_needs(self) -> ModelSettings:
        if self.engine == "remote" and not self.url:
            raise ValueError(f"model {self.name!r}: engine 'remote' needs 'url'")
        if self.engine in ("vllm", "transformers", "auto") and not self.path and not self.url:
            raise ValueError(f"model {self.name!r}: engine {self.engine!r} needs 'path' (a model directory)")
        return self


class RequestLimits(BaseModel):
    max_request_bytes: int = Field(1_048_576, ge=1024)
    max_prompt_tokens: int = Field(1536, ge=1)
    max_output_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, ge=1)
    max_messages: int = Field(256, ge=1)
    max_stop_sequences: int = Field(4, ge=0)


class RateLimitSettings(BaseModel):
    """Defaults for keys that do not set their own; 0 means unlimited."""

    requests_per_minute: int = Field(600, ge=0)
    tokens_per_minute: int = Field(200_000, ge=0)
    max_concurrent_streams: int = Field(16, ge=0)


class CacheSettings(BaseModel):
    enabled: bool = True
    max_entries: int = Field(10_000, ge=1)
    ttl_s: float = Field(600.0, gt=0)


class AuthSettings(BaseModel):
    keys_path: Path | None = Field(None, description="SQLite file of API key hashes (default: <data_dir>/keys.sqlite)")
    reload_interval_s: float = Field(1.0, gt=0, description="how often a gateway picks up new and revoked keys")
    operator_tenants: list[str] = Field(["ops"], description="admin keys of these tenants see and act on every "
                                                             "tenant (dashboard, budgets); other admin keys only "
                                                             "on their own tenant")


class GuardrailSettings(BaseModel):
    enabled: bool = True
    policy_path: Path | None = Field(None, description="YAML policy file (default: the bundled policy); hot-reloaded")
    reload_interval_s: float = Field(2.0, gt=0)
    plant_canary: bool = Field(False, description="append a per-request canary to the system prompt and block "
                                                  "answers that repeat it (system-prompt extraction)")


class FeedbackSettings(BaseModel):
    """The Feedback API: size limits, the rating range, idempotency, and the inference ownership check."""

    max_body_bytes: int = Field(262_144, ge=1024, description="largest feedback request body (HTTP or gRPC)")
    max_comment_chars: int = Field(4096, ge=1)
    max_correction_chars: int = Field(32_768, ge=1)
    rating_min: float = Field(-100.0, allow_inf_nan=False)
    rating_max: float = Field(100.0, allow_inf_nan=False)
    recent_inferences: int = Field(100_000, ge=0, description="inference ids (and tenants) this gateway "
                                                              "remembers for the ownership check")
    idempotency_keys: int = Field(100_000, ge=0, description="idempotency keys remembered for replays and "
                                                             "conflicts (per replica)")
    ingest_grace_s: float = Field(10.0, ge=0, description="how long after its UUIDv7 time an unknown inference "
                                                          "id is re-checked before the answer is 404")
    recheck_interval_s: float = Field(0.25, gt=0, description="first pause between re-checks (doubles, max 2 s)")
    lookup_timeout_s: float = Field(2.0, gt=0, description="per call to the store's ownership lookup")

    @model_validator(mode="after")
    def _rating_range_is_a_range(self) -> FeedbackSettings:
        if not self.rating_min < self.rating_max:
            raise ValueError(f"rating_min ({self.rating_min}) must be below rating_max ({self.rating_max})")
        return self


class LangfuseSettings(BaseModel):
    """A Langfuse project: spans go to its OTLP endpoint, ratings become its scores (HTTP basic auth)."""

    host: str | None = Field(None, description="Langfuse base URL, e.g. https://cloud.langfuse.com (None: off)")
    public_key: str = ""
    secret_key: SecretStr = SecretStr("")
    scores: bool = Field(True, description="forward accepted feedback as Langfuse scores")
    score_queue_size: int = Field(10_000, ge=1, description="scores waiting to be sent; newer ones are dropped when full")
    score_retries: int = Field(5, ge=0, description="retries per score (exponential backoff) before it is dropped")
    timeout_s: float = Field(10.0, gt=0)
    trace_index_size: int = Field(100_000, ge=1, description="recent inference ids whose trace id a score can name")


class TracingSettings(BaseModel):
    """OpenTelemetry spans per request (GenAI conventions), exported over OTLP/HTTP in a background thread."""

    enabled: bool = False
    endpoint: str | None = Field(None, description="OTLP/HTTP base URL, e.g. http://collector:4318 (/v1/traces is "
                                                   "appended unless present); None: only Langfuse, if set")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="sent with every export (e.g. auth)")
    protocol: Literal["http/protobuf"] = "http/protobuf"
    compression: Literal["none", "gzip"] = "none"
    timeout_s: float = Field(10.0, gt=0, description="per export request")
    service_name: str = "servoloop-gateway"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of new traces recorded; an incoming "
                                                                 "traceparent's sampled flag decides for its trace")
    capture_content: bool = Field(False, description="record prompts and answers (as they left the guardrails) "
                                                     "as gen_ai.input/output.messages")
    max_queue_size: int = Field(8192, ge=1, description="spans buffered for export; when full the oldest are "
                                                       "dropped, never waited on")
    max_export_batch_size: int = Field(512, ge=1)
    schedule_delay_ms: int = Field(1000, ge=1, description="longest wait before a partial batch is exported")
    langfuse: LangfuseSettings = Field(default_factory=LangfuseSettings)

    @model_validator(mode="after")
    def _has_a_destination(self) -> TracingSettings:
        lf = self.langfuse
        if lf.host and not (lf.public_key and lf.secret_key.get_secret_value()):
            raise ValueError("tracing.langfuse: 'host' needs 'public_key' and 'secret_key'")
        if self.enabled and not self.endpoint and not lf.host:
            raise ValueError("tracing is enabled but names no destination: set 'endpoint' or 'langfuse.host'")
        if self.max_export_batch_size > self.max_queue_size:
            raise ValueError("tracing: 'max_export_batch_size' must not exceed 'max_queue_size'")
        return self


class HotSwapSettings(BaseModel):
    """Model versions follow the registry: each gateway watches the model events and swaps adapters in."""

    enabled: bool = True
    poll_interval_s: float = Field(2.0, gt=0, description="how often the store is polled when there is no broker")
    cache_dir: Path | None = Field(None, description="where fetched adapters are kept (default: <data_dir>/adapters)")
    drain_timeout_s: float = Field(60.0, ge=0, description="how long an old adapter waits for its requests to "
                                                           "finish before it is unloaded anyway")
    load_timeout_s: float = Field(120.0, gt=0, description="fetch, verify, load and warm of one adapter")
    retry_interval_s: float = Field(30.0, gt=0, description="when a version failed to load (not a hash mismatch: "
                                                            "those are never loaded), how long until it is tried again")
    startup_wait_s: float = Field(15.0, ge=0, description="how long start-up waits to replay the current versions "
                                                          "before serving (then they swap in as they arrive)")


class BudgetSettings(BaseModel):
    """Spend budgets (`servoloop budgets set`): held in memory, read from the store at start and then polled."""

    enabled: bool = Field(True, description="enforce budgets where the gateway can read the store")
    poll_interval_s: float = Field(5.0, gt=0, description="how often budgets and every gateway's spend are re-read "
                                                          "(bounds the over-spend with several gateways)")
    startup_wait_s: float = Field(10.0, ge=0, description="how long start-up waits for the first read (spend "
                                                          "seeded from the store) before serving")
    max_pending: int = Field(100_000, ge=1, description="this gateway's requests remembered until the store shows "
                                                        "them (beyond it the oldest are assumed ingested)")


class ShadowPolicy(BaseModel):
    """Replay a sample of one model's served requests to a shadow arm, after each client has its answer.

    The shadow answer is recorded as an inference event flagged `shadow` (paired to the served one by
    `shadow_of`) for the graders and monitors, and never returned to anyone.
    """

    model: str = Field(min_length=1, description="served model name whose requests are replayed")
    target: str = Field("canary", description="`canary`: the model's canary arm while one is live (requests the "
                                              "canary served are not replayed); or another configured model name")
    version: str | None = Field(None, description="model_version recorded on shadow events (default: the target "
                                                  "route's version; for a model-name target `<name>:<version>`)")
    sample_rate: float = Field(0.1, ge=0, le=1, description="share of successful requests replayed (by a hash of "
                                                           "the request id)")
    max_concurrency: int = Field(2, ge=1, description="shadow requests running at once")
    queue_size: int = Field(256, ge=1, description="replays waiting; when full, new ones are dropped and counted")
    timeout_s: float = Field(60.0, gt=0, description="per shadow request")
    tenants: list[str] = Field(default_factory=list, description="only these tenants' requests (empty: all)")


class GatewaySettings(BaseModel):
    host: str = "0.0.0.0"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    grpc_max_workers: int = Field(0, ge=0, description="0: asyncio server")
    grpc_reflection: bool = True
    drain_timeout_s: float = Field(10.0, ge=0)
    switch_interval_ms: float = Field(
        1.0, gt=0, le=100, description="the interpreter's thread switch interval (Python's default: 5 ms): how long "
                                       "the event loop can wait for the GIL behind the event shipper, the gRPC "
                                       "poller or a worker thread; it bounds their share of a request's tail latency")
    log_prompts: bool = Field(False, description="write prompts and bodies to logs (never on by default)")
    models: list[ModelSettings] = Field(default_factory=list)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    hotswap: HotSwapSettings = Field(default_factory=HotSwapSettings)
    shadow: list[ShadowPolicy] = Field(default_factory=list, description="shadow replays of served traffic")
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)

    @model_validator(mode="after")
    def _fallbacks_name_known_models(self) -> GatewaySettings:
        names = [m.name for m in self.models]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {sorted(dupes)}")
        for m in self.models:
            unknown = [f for f in m.fallbacks if f not in names or f == m.name]
            if unknown:
                raise ValueError(f"model {m.name!r}: fallbacks name unknown or self models: {unknown}")
        for sp in self.shadow:
            if sp.model not in names or (sp.target != "canary" and (sp.target not in names or sp.target == sp.model)):
                raise ValueError(f"shadow policy {sp.model!r} -> {sp.target!r}: `model` must be a configured model and "
                                 "`target` 'canary' or another configured model")
        return self
