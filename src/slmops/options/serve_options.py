"""`slmops serve`: the model and adapters to serve, where to listen, and the limits that keep it up."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from slmops.options.fields import Options, Positive, PositiveInt, option


class ServeOptions(Options):
    model_name_or_path: str = option(help="local Hugging Face folder, .gguf, catalogue alias, hub id, a `slmops "
                                          "finetune` output folder (its merged model, else its base and adapter), "
                                          "or an exported ONNX Runtime GenAI folder (auto-opt, generate-adapter)",
                                     flags=("-m",), group="model")
    adapters: dict[str, str] = option({}, "NAME=PATH,...: PEFT adapter folders or finetune output folders (for an "
                                          "exported MODEL: .onnx_adapter files), each served as model id NAME",
                                      group="model")
    served_model_name: str | None = option(None, "the base model's id in requests (default: the model as given)",
                                           group="model")
    trust_remote_code: bool = option(False, "run the model repository's own Python code (off unless given)",
                                     group="model")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights' dtype for a PyTorch model (auto: fp32 on a CPU, where a greedy answer is the same batched "
                "or alone; bf16 on a GPU). bfloat16 on a CPU with AMX: ~2x faster prompts, but answers near a tie "
                "may differ between batched and alone", group="model")
    host: str = option("127.0.0.1", "address to listen on", group="server")
    port: int = option(8000, "port to listen on", group="server")
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on every /v1 request", group="server")
    max_batch_size: PositiveInt = option(16, "requests decoded together in one batch step", group="limits")
    max_queue: PositiveInt = option(64, "requests waiting beyond the batch; more get 429 with Retry-After",
                                    group="limits")
    max_tokens_limit: PositiveInt = option(1024, "the largest max_tokens a request may ask for", group="limits")
    max_prompt_tokens: PositiveInt | None = option(None, "the longest prompt accepted (default: the model's "
                                                         "context less max_tokens)", group="limits")
    max_body_bytes: PositiveInt = option(1 << 20, "the largest request body accepted (413 beyond)", group="limits")
    request_timeout: Positive = option(300.0, "seconds a request may take, queueing included (408 beyond)",
                                       group="limits")

    @field_validator("adapters", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """NAME=PATH pairs, comma-separated on the command line."""
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            pairs = {}
            for item in value:
                name, sep, path = str(item).partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise ValueError(f"expected NAME=PATH, got {item!r}")
                pairs[name.strip()] = path.strip()
            return pairs
        return value

    def problems(self) -> list[str]:
        if not 0 < self.port < 65536:
            return [f"--port must lie in 1..65535, got {self.port}"]
        return []
