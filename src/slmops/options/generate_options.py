"""`slmops generate`: one prompt, one model (plus adapter), streamed."""

from __future__ import annotations

from slmops.options.fields import Options, PositiveInt, option


class GenerateOptions(Options):
    model_name_or_path: str | None = option(None, "model folder, .gguf, alias, hub id, or ONNX Runtime GenAI folder "
                                                  "(default: the adapter's base model)", flags=("-m",), group="model")
    adapter_path: str | None = option(None, "adapter folder, or a `slmops finetune` output folder", group="model")
    adapter: str | None = option(None, "for an ONNX multi-adapter folder (`slmops generate-adapter`): the adapter "
                                       "to answer with (default: none, the base model)", group="model")
    trust_remote_code: bool = option(False, "run the model repository's own Python code", group="model")
    prompt: str = option(help=r"the prompt text (\n and \t typed in the shell become a newline and a tab)",
                         group="generation")
    chat: bool = option(False, "wrap the prompt as a user message with the chat template", group="generation")
    max_new_tokens: PositiveInt = option(128, "most tokens to generate", group="generation")
    do_sample: bool = option(False, "sample instead of greedy decoding", group="generation")
    temperature: float = option(1.0, "sampling temperature (with --do_sample)", group="generation")
    top_p: float = option(1.0, "nucleus sampling mass (with --do_sample)", group="generation")
    seed: int = option(42, "sampling seed")

    def problems(self) -> list[str]:
        if self.model_name_or_path is None and self.adapter_path is None:
            return ["pass --model_name_or_path, or --adapter_path to use the adapter's base model"]
        return []
