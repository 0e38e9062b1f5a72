"""`slmops serve` on an exported folder (`slmops generate-adapter`): ONNX Runtime GenAI's engine batches the
base's requests, each adapter answers by name, every greedy answer is the one the exported model gives alone,
and an adapter file that does not fit the graph is refused with a 400 while the server keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_adapter
from slmops.cli import main
from slmops.errors import UsageError
from slmops.models.genai import GenaiModel
from slmops.models.tokenizers import load_tokenizer
from slmops.options.serve_options import ServeOptions
from slmops.serving.app import open_pool
from test_serve import post, server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def multi(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_onnx")
    small = make_adapter(tiny_llama, root / "small", ["q_proj", "v_proj"], 4, 1)
    big = make_adapter(tiny_llama, root / "big", ["q_proj", "v_proj"], 8, 2)
    out = root / "multi"
    assert main(["generate-adapter", "-m", str(tiny_llama), "--adapter_paths", f"{small},{big}",
                 "--adapter_names", "small,big", "-o", str(out), "--parity_prompts", "2"]) == 0
    return out


def test_exported_folder_served_batched_and_by_adapter(multi, tiny_llama, tmp_path):
    prompts = ["the film was", "a dull and", "what a lovely day", "i would not"]
    ids = ["base", "small", "big", "base"]
    with server(str(multi), "--served_model_name", "base", "--max_batch_size", "4") as (url, proc):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["base", "big", "small"]

        def complete(pair):
            model, prompt = pair
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text, r.usage.completion_tokens

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(complete, zip(ids, prompts)))
        alone = [complete(pair) for pair in zip(ids, prompts)]
        assert together == alone and all(n == 8 for _, n in together)
        onnx, tok = GenaiModel(multi), load_tokenizer(str(multi))
        for (text, _), model, prompt in zip(together, ids, prompts):
            want = onnx.generate(tok(prompt)["input_ids"], 8, None if model == "base" else model)
            shown = (tok.decode(want[:k], skip_special_tokens=True) for k in range(len(want), -1, -1))
            assert text == next(t for t in shown if not t.endswith("\ufffd"))  # a split character waits
        assert len({t for t, _ in together[:3]}) == 3  # the adapters answer differently from the base

        chat = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0, stream=True)
        assert [c.choices[0].finish_reason for c in chat][-1] in ("stop", "length")

        peft_folder = make_adapter(tiny_llama, tmp_path / "p", ["q_proj"], 2, 3)
        status, body = post(url, "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": str(peft_folder)})
        assert status == 400 and ".onnx_adapter" in body["error"]["message"]
        misfit = {"lora_name": "wide", "lora_path": str(_misfit(multi, tmp_path))}
        status, body = post(url, "/v1/load_lora_adapter", misfit)
        assert status == 400 and "another base model" in body["error"]["message"]
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "big"})[0] == 200
        with pytest.raises(openai.NotFoundError):
            complete(("big", "x"))
        assert post(url, "/v1/load_lora_adapter", {"lora_name": "big2",
                                                   "lora_path": str(multi / "adapters/big.onnx_adapter")})[0] == 200
        assert complete(("big2", prompts[2])) == together[2]


def _misfit(multi, tmp_path):
    """The small adapter with one tensor one row wider: an adapter exported for another base model."""
    import numpy as np
    import onnxruntime as ort

    source = ort.AdapterFormat.read_adapter(str(multi / "adapters/small.onnx_adapter"))
    params = {name: value.numpy() for name, value in source.get_parameters().items()}
    name = next(n for n in params if "lora_A" in n)
    params[name] = np.zeros((params[name].shape[0] + 1, params[name].shape[1]), np.float32)
    wide = ort.AdapterFormat()
    wide.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in params.items()})
    wide.export_adapter(str(tmp_path / "wide.onnx_adapter"))
    return tmp_path / "wide.onnx_adapter"


def test_torch_dtype_on_an_exported_folder_is_refused_before_loading(multi):
    with pytest.raises(UsageError, match="--torch_dtype bfloat16: .* chosen at export"):
        open_pool(ServeOptions(model_name_or_path=str(multi), torch_dtype="bfloat16"))
