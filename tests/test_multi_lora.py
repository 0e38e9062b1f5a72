"""The server's per-row adapter mixing gives what peft gives for each row, and refuses what it cannot mix."""

from __future__ import annotations

import pytest
import torch

from slmops.errors import UsageError
from slmops.models.loading import load_model
from slmops.serving.multi_lora import MixedLoraLinear, Routing, add_adapter, read_lora, remove_adapter

from conftest import make_adapter

ROWS = ["tone", "__base__", "mood", "tone", "mood", "__base__"]


@pytest.fixture(scope="module")
def two(tiny_llama, tmp_path_factory):
    """Adapters unlike each other: other ranks, other layers, rsLoRA and a per-layer alpha in one."""
    root = tmp_path_factory.mktemp("mixed")
    tone = make_adapter(tiny_llama, root / "tone", ["q_proj", "v_proj", "down_proj"], r=4, seed=1)
    mood = make_adapter(tiny_llama, root / "mood", ["q_proj", "o_proj", "up_proj"], r=8, seed=2,
                        alpha_pattern={"o_proj": 3.0}, lora_alpha=5)
    rs = make_adapter(tiny_llama, root / "rs", ["k_proj"], r=2, seed=3, use_rslora=True)
    return {"tone": tone, "mood": mood, "rs": rs}


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 60, (len(ROWS), 7), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_rows_under_different_adapters_match_peft(tiny_llama, two):
    from peft import PeftModel

    ids = batch()
    reference = PeftModel.from_pretrained(load_model(str(tiny_llama), torch.float32), two["tone"], adapter_name="tone")
    reference.load_adapter(two["mood"], adapter_name="mood")
    want = reference(input_ids=ids, adapter_names=ROWS).logits

    model, routing = load_model(str(tiny_llama), torch.float32).eval(), Routing()
    base = model(input_ids=ids).logits
    for name in ("tone", "mood"):
        add_adapter(model, routing, name, read_lora(two[name], model))
    routing.route(ROWS, ids.device)
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapter changed its rows
    torch.testing.assert_close(got[1], base[1], atol=1e-5, rtol=1e-5)  # and left the base's rows alone

    routing.route(["mood"] * len(ROWS), ids.device)  # one adapter for every row: no mask
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids, adapter_names=["mood"] * len(ROWS)).logits,
                               atol=1e-4, rtol=1e-4)

    remove_adapter(model, "tone")
    remove_adapter(model, "mood")
    assert not any(isinstance(m, MixedLoraLinear) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, base)


@torch.no_grad()
def test_rslora_scaling_is_peft_s(tiny_llama, two):
    from peft import PeftModel

    ids = batch(1)
    want = PeftModel.from_pretrained(load_model(str(tiny_llama), torch.float32), two["rs"]).eval()(input_ids=ids).logits
    model, routing = load_model(str(tiny_llama), torch.float32).eval(), Routing()
    add_adapter(model, routing, "rs", read_lora(two["rs"], model))
    routing.route(["rs"] * len(ROWS), ids.device)
    torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_adapters_it_cannot_mix_are_refused_by_name(tiny_llama, tmp_path):
    model = load_model(str(tiny_llama), torch.float32)
    dora = make_adapter(tiny_llama, tmp_path / "dora", ["q_proj"], r=2, seed=4, use_dora=True)
    with pytest.raises(UsageError, match="a DoRA adapter"):
        read_lora(dora, model)
    saved = make_adapter(tiny_llama, tmp_path / "saved", ["q_proj"], r=2, seed=5, modules_to_save=["lm_head"])
    with pytest.raises(UsageError, match="lm_head.*modules_to_save"):
        read_lora(saved, model)
