"""The CPU adapter layers: the same masks, losses and gradients as peft's, only cheaper."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import build_model
from slmops.training.speed.fast_lora import FastDropout, FusedLoraLinear, bernoulli_positions, use_fast_lora


def test_fast_dropout_keeps_the_rate_the_scale_and_the_seed():
    drop = FastDropout(0.05).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(0.95, abs=1e-3)  # 1e6 draws: the standard error is 2e-4
    assert y.mean().item() == pytest.approx(1.0, abs=2e-3)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes exactly where the input did
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)
    torch.manual_seed(1)
    assert not torch.equal(drop(x), y)
    # neighbouring elements are drawn independently
    mask = (y != 0).flatten().float()
    both = (mask[:-1] * mask[1:]).mean().item()
    assert both == pytest.approx(kept * kept, abs=2e-3)
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_bernoulli_positions_draw_each_element_independently(p):
    torch.manual_seed(0)
    n, draws = 5000, 2000
    # sigmas=-2 leaves most first rounds short of n, so the draw continues in further rounds
    hits = torch.zeros(draws, n)
    for row in hits:
        positions = bernoulli_positions(n, p, sigmas=-2.0)
        assert torch.all(positions[1:] > positions[:-1]) and torch.all((positions >= 0) & (positions < n))
        row[positions] = 1
    per_element = hits.mean(0)
    std = (p * (1 - p) / draws) ** 0.5
    assert torch.all((per_element - p).abs() < 5 * std)  # every position, the first and last included
    pairs = (hits[:, :-1] * hits[:, 1:]).mean().item()  # neighbours independent
    assert pairs == pytest.approx(p * p, abs=5 * std)
    counts = hits.sum(1)  # the number dropped is binomial: its variance too
    assert counts.var().item() == pytest.approx(n * p * (1 - p), rel=0.1)


def peft_pair(path, dropout: float, **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """peft's layers (with `FastDropout`, so both draw the same masks) and a copy switched to the fused ones."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             init_lora_weights=False, **config))
    fused = copy.deepcopy(model)
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, d in list(dropouts.items()):
                if isinstance(d, torch.nn.Dropout) and d.p > 0:
                    dropouts[name] = FastDropout(d.p)
    use_fast_lora(fused)
    return model, fused


def loss_and_grads(model, ids, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def fused_calls(model) -> list[str]:
    """The autograd node behind each switched layer's output in the next forward pass."""
    seen = []
    for module in model.modules():
        if isinstance(module, FusedLoraLinear):
            module.register_forward_hook(lambda m, args, out: seen.append(type(out.grad_fn).__name__))
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # Qwen2's q/k/v carry a bias
def test_fused_layers_learn_exactly_what_peft_layers_do(family, dropout, tokenizer_dir, models_root):
    reference, fused = peft_pair(build_model(tokenizer_dir, models_root, family), dropout)
    reference.train(), fused.train()
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    calls = fused_calls(fused)
    loss_ref, grads_ref = loss_and_grads(reference, ids)
    loss_fused, grads_fused = loss_and_grads(fused, ids)
    assert calls and set(calls) == {"_LoraLinearFunctionBackward"}  # every layer took the fused path
    assert grads_ref.keys() == grads_fused.keys()
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-6, atol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-4, atol=1e-6)
    # another seed draws other masks: the comparison above was not between two unmasked runs
    if dropout:
        assert not torch.equal(loss_and_grads(fused, ids, seed=4)[0], loss_fused)
    # evaluation: no dropout, no graph
    reference.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert fused.state_dict().keys() == reference.state_dict().keys()


def test_fused_layers_follow_autocast_like_peft(tiny_llama):
    reference, fused = peft_pair(tiny_llama, 0.1)
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = loss_and_grads(reference.train(), ids)
        loss_fused, grads_fused = loss_and_grads(fused.train(), ids)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=2e-2, atol=0)
    for name in grads_ref:
        assert grads_fused[name].dtype == torch.float32  # the adapter's weights stay fp32
        cosine = torch.nn.functional.cosine_similarity(grads_fused[name].flatten(), grads_ref[name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_the_fused_path_steps_aside_for_what_it_does_not_compute(tiny_llama):
    ids = torch.randint(5, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    # DoRA: peft's own path, same result
    reference, fused = peft_pair(tiny_llama, 0.0, use_dora=True)
    calls = fused_calls(fused)
    torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert calls and "_LoraLinearFunctionBackward" not in calls
    # adapters switched off, or merged into the weights
    reference, fused = peft_pair(tiny_llama, 0.0)
    with fused.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    fused.merge_adapter()
    torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_use_fast_lora_switches_every_adapter_layer(tokenizer_dir, models_root):
    model = AutoModelForCausalLM.from_pretrained(build_model(tokenizer_dir, models_root, "llama"))
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"))]
    assert use_fast_lora(model) == len(layers) > 0
    assert all(isinstance(m, FusedLoraLinear) and m.lora_dropout["default"].p == 0.1 for m in layers)
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    # GPT-2's Conv1D layers keep peft's layer (transposed weights) but get the cheaper dropout
    gpt2 = AutoModelForCausalLM.from_pretrained(build_model(tokenizer_dir, models_root, "gpt2"))
    gpt2 = get_peft_model(gpt2, LoraConfig(r=4, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True))
    use_fast_lora(gpt2)
    attn = gpt2.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(attn.lora_dropout["default"], FastDropout)
    assert attn._fusable(torch.zeros(1, 2, 64), (), {}) is None


def test_gradient_checkpointing_replays_the_same_masks(tiny_llama):
    _, fused = peft_pair(tiny_llama, 0.1)
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(fused.train(), ids)
    # the recomputed forward draws its masks again: from torch's replayed RNG state, so the same ones
    fused.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = loss_and_grads(fused, ids)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)
