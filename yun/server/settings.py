"""Settings of the HTTP server (the engine's own settings live in `yun.config.EngineConfig`).

Like `EngineConfig`, every field carries its CLI help in `metadata["help"]`, so the flags
of `yun serve` are generated from this one list (`metadata["choices"]` lists the allowed
values; `metadata["size"]` marks a byte count that the CLI parses with `parse_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from yun.server.reasoning import REASONING_PARSER_CHOICES
from yun.server.tool_parsers import TOOL_PARSER_CHOICES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
ROUTING_CHOICES = ("prefix", "least-loaded", "round-robin")  # = ray_replicas.ROUTING_POLICIES


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerSettings:
    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 to accept other machines).")
    port: int = _opt(8000, "TCP port to listen on (0 picks a free one).")
    api_key: str | tuple[str, ...] | None = _opt(
        None, "Require this key on the API routes, as `Authorization: Bearer KEY` or "
        "`x-api-key: KEY` (Anthropic clients); repeat the flag to accept several keys. "
        "Default: no key.", repeat=True)
    api_key_file: str | None = _opt(
        None, "Also accept the keys listed in this file, one per line (blank lines and "
        "lines starting with # are skipped); read once at start-up.")
    tenants: bool = _opt(
        False, "Serve many tenants: every API request needs a tenant's key (created with "
        "`yun admin keys create`), is admitted against its tenant's and key's limits, and "
        "leaves a usage record in the tenants database. Implied by --database and "
        "--admin-key.")
    database: str | None = _opt(
        None, "The tenants database: postgresql://USER:PASSWORD@HOST/DB (psycopg) to share "
        "tenants, limits and usage between servers, or sqlite:///PATH. Default: "
        "tenants.db under the data folder ($YUN_DATA_DIR, else $XDG_DATA_HOME/yun, else "
        "~/.local/share/yun).")
    admin_key: str | None = _opt(
        None, "Serve the admin API (/admin/tenants, /admin/keys, /admin/usage) to "
        "`Authorization: Bearer ADMIN_KEY` (at least 16 characters). Default: no admin API.")
    served_model_name: str | None = _opt(
        None, "The model name clients send and see in /v1/models. Default: the MODEL "
        "argument as given, or SmolLM2-135M-Instruct for the default model.")
    max_queue: int = _opt(
        1024, "Most requests waiting for a free slot (beyond --max-num-seqs running); "
        "past it new requests get 429 with Retry-After.")
    max_body_bytes: int = _opt(
        16 * 2**20, "Largest request body in bytes (suffixes K, M, G accepted on the CLI); "
        "larger ones get 413.", size=True)
    shutdown_timeout: float = _opt(
        5.0, "Seconds in-flight requests get to finish after Ctrl-C or SIGTERM before they "
        "are aborted.")
    log_level: str = _opt("info", "Server log level.", choices=LOG_LEVELS)
    ui: bool = _opt(True, "Serve the chat page at / (a browser chat over this server's own "
                    "/v1/chat/completions: streaming, reasoning, tools, tokens/s). "
                    "--no-ui: a plain landing page listing the endpoints and a curl line.")
    replicas: int = _opt(
        1, "Serve with this many full engines (replicas), each in its own Ray actor, behind "
        "this one HTTP front end; needs Ray (pip install 'yun[ray]'). Without "
        "--ray-address, yun starts a local Ray cluster on this machine (loopback only).")
    ray_address: str | None = _opt(
        None, "Run the replicas on this Ray cluster (`auto` for the one `ray start` made "
        "on this machine, or HOST:PORT of its head) instead of a local one.")
    routing: str = _opt(
        "prefix", "How requests are spread over replicas: prefix (to the replica most "
        "likely to hold the prompt's first KV blocks in cache, else the least loaded), "
        "least-loaded, or round-robin.", choices=ROUTING_CHOICES)
    tool_call_parser: str = _opt(
        "auto", "How the model writes tool calls: hermes (<tool_call>{json}</tool_call>: "
        "Qwen2.5, Qwen3, QwQ, Hermes) or deepseek_v3 (DeepSeek's tool tokens, V3 / R1 / "
        "V3.1); auto picks from the chat template; none turns tool parsing off.",
        choices=TOOL_PARSER_CHOICES)
    reasoning_parser: str = _opt(
        "auto", "How the model marks its reasoning: think (<think>...</think>: DeepSeek-R1 "
        "and its distills, Qwen3, QwQ; deepseek_r1 and qwen3 are the same); auto turns it "
        "on when the chat template uses </think>; none returns the raw text.",
        choices=REASONING_PARSER_CHOICES)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be non-negative, got {self.max_queue}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.shutdown_timeout < 0:
            raise ValueError(
                f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.tool_call_parser not in TOOL_PARSER_CHOICES:
            raise ValueError(f"tool_call_parser must be one of {TOOL_PARSER_CHOICES}, got "
                             f"{self.tool_call_parser!r}")
        if self.reasoning_parser not in REASONING_PARSER_CHOICES:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSER_CHOICES}, "
                             f"got {self.reasoning_parser!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be positive, got {self.replicas}")
        if self.routing not in ROUTING_CHOICES:
            raise ValueError(f"routing must be one of {ROUTING_CHOICES}, got {self.routing!r}")
        if isinstance(self.api_key, (list, tuple)):
            object.__setattr__(self, "api_key", tuple(self.api_key) or None)
        keys = (self.api_key,) if isinstance(self.api_key, str) else (self.api_key or ())
        if any(not k.strip() for k in keys):
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if self.admin_key is not None and len(self.admin_key.strip()) < 16:
            raise ValueError("admin_key must have at least 16 characters")
        if self.admin_key is not None and self.admin_key in keys:
            raise ValueError("admin_key must differ from api_key")

    @property
    def multi_tenant(self) -> bool:
        return self.tenants or self.database is not None or self.admin_key is not None

    def api_keys(self) -> tuple[str, ...]:
        """Every accepted key: --api-key's and the lines of --api-key-file (read now)."""
        keys = (self.api_key,) if isinstance(self.api_key, str) else (self.api_key or ())
        if self.api_key_file is not None:
            with open(self.api_key_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            listed = tuple(k for k in lines if k and not k.startswith("#"))
            if not listed:
                raise ValueError(f"api_key_file {self.api_key_file!r} lists no key")
            keys += listed
        return keys

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
