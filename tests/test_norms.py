"""The fused CPU RMSNorm: the model's own forward bit for bit, its gradients, and only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model
from transformers import AutoModelForCausalLM

from slmops.training.speed.norms import use_fused_norms


def loss_and_grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    model.zero_grad()
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeddings, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, embeddings.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # Qwen3 also norms each head's queries and keys
def test_fused_norms_compute_the_models_own_forward_and_gradients(family, dtype, tokenizer_dir, models_root):
    reference = AutoModelForCausalLM.from_pretrained(build_model(tokenizer_dir, models_root, family), dtype=dtype)
    with torch.no_grad():  # weights other than ones, as after training
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    fused = copy.deepcopy(reference)
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in reference.modules())
    assert use_fused_norms(fused) == norms > 0
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    loss_ref, grads_ref, input_ref = loss_and_grads(reference, ids)
    loss_fused, grads_fused, input_fused = loss_and_grads(fused, ids)
    assert torch.equal(loss_fused, loss_ref)
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(input_fused, input_ref, **tolerance)
    for name in grads_ref:  # every weight trains here, the norms' included
        torch.testing.assert_close(grads_fused[name], grads_ref[name], **tolerance)
    assert fused.state_dict().keys() == reference.state_dict().keys()


def test_a_norm_computed_otherwise_keeps_its_own_forward(tokenizer_dir, models_root):
    """Gemma scales by 1 + weight: the probe sees a different forward and leaves its norms alone."""
    model = AutoModelForCausalLM.from_pretrained(build_model(tokenizer_dir, models_root, "gemma"))
    classes = {type(m) for m in model.modules()}
    assert use_fused_norms(model) == 0
    assert {type(m) for m in model.modules()} == classes
