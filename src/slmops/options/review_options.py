"""`slmops review`: the models and prompts to compare, how answers are generated, where the review lives
and is served, and `--results` to read one."""

from __future__ import annotations

from slmops.options.fields import Options, PositiveInt, option


class ReviewOptions(Options):
    models: list[str] = option([], "NAME=PATH or PATH (named by its last part), comma-separated, at least two. PATH "
                                   "is what `evaluate --compare` takes: MODEL (anything -m takes, exported ONNX "
                                   "folders too), MODEL@ADAPTER or @ADAPTER; an adapter or finetune output folder "
                                   "alone runs on its recorded base. Default: the names in the prompts file's "
                                   "answers", group="model")
    prompts: str | None = option(None, "JSONL file, one {\"prompt\": TEXT} per line, optionally with \"id\" and "
                                       "\"answers\": {NAME: TEXT} (those answers are used, not generated)",
                                 group="data", metavar="FILE")
    output_path: str | None = option(None, "the review folder: answers, votes database, manifest (default: "
                                           "reviews/PROMPTS_NAME). An existing review folder is continued",
                                     flags=("-o",))
    overwrite: bool = option(False, "start the review in --output_path afresh, dropping its answers and votes")
    results: str | None = option(None, "print the results of review folder DIR (win rates, ranking, agreement), "
                                       "write its results.json and votes.csv, and exit", metavar="DIR")
    pairs_per_prompt: PositiveInt | None = option(None, "with more than two models: review this many randomly "
                                                        "drawn pairs of models per prompt (default: every pair)")
    seed: int = option(0, "seed for the drawn pairs and each reviewer's order of items")
    use_chat_template: bool = option(False, "render each prompt as one user message with the tokenizer's chat "
                                            "template before generating", group="generation")
    max_new_tokens: PositiveInt = option(256, "the longest answer generated, in tokens", group="generation")
    batch_size: PositiveInt = option(8, "prompts generated together", group="generation")
    trust_remote_code: bool = option(False, "run the model repository's own Python code (off unless given)",
                                     group="model")
    serve: bool = option(True, "serve the review page; false: only write the review folder (serve it later with "
                               "`slmops review -o DIR`)", group="server")
    host: str = option("127.0.0.1", "address to listen on", group="server")
    port: int = option(8080, "port to listen on", group="server")

    def problems(self) -> list[str]:
        found = []
        if not 0 < self.port < 65536:
            found.append(f"--port must lie in 1..65535, got {self.port}")
        if self.results and (self.models or self.prompts):
            found.append("--results reads a finished review folder; drop --models and --prompts")
        if not self.results and not self.prompts and not self.output_path:
            found.append("pass --prompts FILE (with --models), or -o DIR to continue a review folder")
        return found
