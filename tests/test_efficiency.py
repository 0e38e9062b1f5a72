"""Packing, logits at supervised positions only, attention row by row: faster, same learning."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, build_model
from slmops.data.collate import Collator, shared_prefix
from slmops.data.formatting import IGNORE
from slmops.training.speed.attention import segmented_sdpa, use_segmented_attention
from slmops.training.speed.fast_lora import use_fast_lora
from slmops.training.speed.lengths import round_packed_lengths, rounded_length
from slmops.training.speed.logits import causal_lm_loss, last_mlp, mlp_at_kept_positions
from slmops.training.speed.memory import keep_freed_memory
from slmops.training.speed.packing import drops_out, supports_packing


def varied_rows(n: int = 6, vocab: int = 300, prefix: list[int] = ()) -> list[dict]:
    """Rows of different lengths, each with a supervised tail of 1-3 tokens, all starting with `prefix`."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 4 + 3 * i + len(prefix)
        ids = [*prefix, *torch.randint(5, vocab, (length - len(prefix),), generator=g).tolist()]
        answer = 1 + i % 3
        rows.append({"input_ids": ids, "labels": [IGNORE] * (length - answer) + ids[-answer:]})
    return rows


def lora(path, segmented: bool = True) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False  # as in training: transformers keeps packed rows apart only without a cache
    if segmented:
        # every family here runs on SDPA except Gemma 2 (eager, for its logit soft-capping)
        assert use_segmented_attention(model) == (model.config.model_type != "gemma2")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    return model.eval()  # no dropout anywhere (GPT-2 has its own): the two batches must meet exactly


def loss_and_grads(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    labels = batch.pop("labels")
    loss = causal_lm_loss(model(**batch), labels)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("segmented", [True, False], ids=["row-by-row-attention", "masked-attention"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_batch_learns_exactly_what_the_padded_batch_does(family, segmented, tokenizer_dir, models_root):
    path = build_model(tokenizer_dir, models_root, family)
    model = lora(path, segmented)
    assert supports_packing(model)
    rows = varied_rows()
    padded = Collator(0, pack=False, keep_logits=False)(rows)
    # transformers' own loss on the padded batch is the reference
    reference = model(**{k: v for k, v in padded.items()}).loss.item()
    loss_pad, grads_pad = loss_and_grads(model, padded)
    packed = Collator(0, pack=True)(rows)
    assert packed["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows) - len(rows)  # no padding, no last tokens
    loss_pack, grads_pack = loss_and_grads(model, packed)
    assert loss_pad == pytest.approx(reference, rel=1e-5)
    assert loss_pack == pytest.approx(reference, rel=1e-5)
    for a, b in zip(grads_pad, grads_pack):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])  # Gemma 2 runs eager attention
def test_a_shared_prefix_computed_once_learns_exactly_what_the_padded_batch_does(family, tokenizer_dir,
                                                                                   models_root):
    model = lora(build_model(tokenizer_dir, models_root, family))
    rows = varied_rows(prefix=[3, 9, 4])
    loss_pad, grads_pad = loss_and_grads(model, Collator(0, pack=False, keep_logits=False)(rows))
    batch = Collator(0, pack=True, share_prefix=True)(rows)
    # the prefix once (15 tokens saved) and no row's closing target as an input (6 more)
    assert int(batch["shared_prefix"]) == 3 and batch["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows) - 21
    loss_shared, grads_shared = loss_and_grads(model, batch)
    assert loss_shared == pytest.approx(loss_pad, rel=1e-5)
    for a, b in zip(grads_pad, grads_shared):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_is_found_in_adapters_layers_and_config(tiny_llama, tokenizer_dir, models_root):
    """What decides whether a shared prefix is exact by default."""
    def adapted(path, p):
        model = AutoModelForCausalLM.from_pretrained(path)
        return get_peft_model(model, LoraConfig(r=4, lora_dropout=p, target_modules="all-linear"))
    assert not drops_out(adapted(tiny_llama, 0.0))
    assert drops_out(adapted(tiny_llama, 0.05))
    fast = adapted(tiny_llama, 0.05)
    use_fast_lora(fast)
    assert drops_out(fast)
    quiet = AutoModelForCausalLM.from_pretrained(tiny_llama)
    quiet.config.attention_dropout = 0.1  # a kernel argument, found in the config only
    assert drops_out(quiet)
    gpt2 = AutoModelForCausalLM.from_pretrained(build_model(tokenizer_dir, models_root, "gpt2"))
    assert drops_out(gpt2)  # GPT-2's own dropout layers


def test_the_shared_prefix_stops_before_any_rows_first_target():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, IGNORE, 4, 5]},
            {"input_ids": [1, 2, 3, 4, 6], "labels": [IGNORE] * 4 + [6]}]
    # Four tokens in common, but token 4 is the first row's target: its prediction needs token 3 in that
    # row, and the token after the prefix is never a target (it follows another row in the pack).
    assert shared_prefix(rows) == 2
    batch = Collator(0, pack=True, keep_logits=False, share_prefix=True)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 4, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 4, 5, IGNORE, IGNORE, 6]]
    assert batch["row_bounds"].tolist() == [0, 2, 5, 8]
    # for a loss on kept logits, each row stops before its last target, and labels run one place on
    batch = Collator(0, pack=True, share_prefix=True)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 4, 5, IGNORE, 6]]
    assert batch["logits_to_keep"].tolist() == [[False, False, True, True, False, True]]
    assert batch["row_bounds"].tolist() == [0, 2, 4, 6]
    assert shared_prefix(rows[:1]) == 0 and shared_prefix([rows[0], {**rows[1], "input_ids": [9, 2, 3, 4, 6]}]) == 0


def test_packed_rows_never_learn_across_their_boundary():
    rows = [{"input_ids": [7, 8, 9], "labels": [7, 8, 9]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = Collator(0, pack=True, keep_logits=False)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # token 4 starts the second row: nothing before it in its own row predicts it
    assert batch["labels"].tolist() == [[IGNORE, 8, 9, IGNORE, 5]]
    assert batch["row_bounds"].tolist() == [0, 3, 5]
    # kept logits: a row's last token predicts nothing and is left out; each position's target is its own row's
    batch = Collator(0, pack=True)(rows)
    assert batch["input_ids"].tolist() == [[7, 8, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 8, 9, 5]]
    assert batch["logits_to_keep"].tolist() == [[True, True, True]]
    assert batch["row_bounds"].tolist() == [0, 2, 3]


def test_probe_refuses_a_model_whose_attention_crosses_rows(tiny_llama, monkeypatch):
    import transformers.masking_utils as masking

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert supports_packing(model)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not supports_packing(model)


def test_a_bf16_row_gets_the_same_logits_packed_or_alone(tiny_llama):
    """Short bf16 rows attend in fp32 whether packed or not, so packing changes no bit of a row's logits
    (a bf16 row that attended in bf16 alone and in fp32 packed moved SmolLM2's logits by 0.2 std, enough
    for the packing probe to refuse the model)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    model.config.use_cache = False
    assert use_segmented_attention(model) and supports_packing(model)
    rows = [[5, 9, 2, 7, 3, 8, 4], [6, 1, 9, 2, 5]]
    batch = Collator(0, pack=True, keep_logits=False)([{"input_ids": r, "labels": r} for r in rows])
    batch.pop("labels")
    batch["logits_to_keep"] = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[0] for r in rows])
        packed = model(**batch).logits
    assert torch.equal(packed, alone)


def spy_attention_lengths(monkeypatch) -> list[int]:
    """Record the query length of every call to PyTorch's SDPA."""
    lengths, original = [], F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return lengths


def test_row_by_row_attention_is_transformers_sdpa_on_each_row(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    bounds, rows = torch.tensor([0, 3, 7]), [(0, 3), (3, 7)]

    def per_row(**kwargs):
        return torch.cat([sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, **kwargs)[0]
                          for a, b in rows], dim=1)

    lengths = spy_attention_lengths(monkeypatch)
    # what the Trainer passes along (num_items_in_batch) changes nothing
    out, _ = segmented_sdpa(module, q, k, v, None, row_bounds=bounds, scaling=0.3, dropout=0.0, sliding_window=None,
                            num_items_in_batch=torch.tensor(5))
    assert lengths == [3, 4] and out.is_contiguous()
    torch.testing.assert_close(out, per_row(scaling=0.3))  # grouped heads, scale and layout as the wrapper's
    # an argument only transformers' wrapper applies sends each row through it
    out, _ = segmented_sdpa(module, q, k, v, None, row_bounds=bounds, scaling=0.3, is_causal=False)
    bidirectional = per_row(scaling=0.3, is_causal=False)
    torch.testing.assert_close(out, bidirectional)
    assert not torch.allclose(bidirectional, per_row(scaling=0.3))


@pytest.mark.parametrize("inputs", [torch.bfloat16, torch.float32])
def test_short_rows_attend_in_fp32_under_bf16_autocast(inputs):
    """On a CPU, short rows are faster in fp32 than in bf16 (and no less exact): autocast must not cast
    them back to bf16 (nor cast fp32 inputs down), and the output is in autocast's dtype, as SDPA's."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 7, 8).bfloat16().to(inputs) for h in (4, 2, 2))
    bounds, rows = torch.tensor([0, 3, 7]), [(0, 3), (3, 7)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segmented_sdpa(module, q, k, v, None, row_bounds=bounds, scaling=0.3, dropout=0.0)
    in_fp32 = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b].float(), k[:, :, a:b].float(),
                                                        v[:, :, a:b].float(), is_causal=True, scale=0.3,
                                                        enable_gqa=True) for a, b in rows], dim=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, in_fp32.transpose(1, 2).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("share", [False, True], ids=["rows", "rows-after-a-shared-prefix"])
def test_row_by_row_attention_respects_a_sliding_window(share, tokenizer_dir, models_root, monkeypatch):
    """A row longer than the window must see only the window, as transformers' masks do."""
    import transformers

    tok_path = build_model(tokenizer_dir, models_root, "llama")
    config = transformers.Qwen2Config(vocab_size=399, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.use_cache = False
    assert tok_path and model.config.layer_types[0] == "sliding_attention"
    prefix = [3, 9, 4] if share else []
    rows = varied_rows(3, vocab=399, prefix=prefix)
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
        assert use_segmented_attention(model)
        batch = Collator(0, pack=True, keep_logits=False, share_prefix=share)(rows)
        batch.pop("labels")
        lengths = spy_attention_lengths(monkeypatch)
        packed = model(**batch).logits[0]
    # the prefix's logits once, then each row's own
    expected = torch.cat([reference[0][:len(prefix)], *(r[len(prefix):] for r in reference)])
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=1e-5)
    assert lengths == (([3] if share else []) + [4, 7, 10]) * 2  # prefix, then each row alone; both layers


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma2", "gpt2"])
def test_the_last_mlp_at_kept_positions_only_learns_exactly_the_same(family, tokenizer_dir, models_root):
    model = lora(build_model(tokenizer_dir, models_root, family), segmented=False)
    batch = Collator(0, pack=True)(varied_rows())
    loss_all, grads_all = loss_and_grads(model, dict(batch))
    assert mlp_at_kept_positions(model)
    rows = []
    last_mlp(model).register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2]))
    loss_kept, grads_kept = loss_and_grads(model, dict(batch))
    assert rows == [int(batch["logits_to_keep"].sum())] < [batch["input_ids"].shape[1]]
    assert loss_kept == pytest.approx(loss_all, rel=1e-6)
    for a, b in zip(grads_all, grads_kept):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # without kept logits (a pair loss reads hidden states) the MLP runs everywhere
    rows.clear()
    model(input_ids=batch["input_ids"])
    assert rows == [batch["input_ids"].shape[1]]


def test_rounded_lengths_are_few_per_doubling():
    assert [rounded_length(n) for n in (1, 16, 17, 255, 256, 257, 350, 2049)] == [16, 16, 32, 256, 256, 272, 352, 2176]
    assert len({rounded_length(n) for n in range(257, 513)}) == 16


def test_a_bf16_packed_batch_rounded_up_learns_the_same(tiny_llama):
    """On a bf16 CPU model the pack grows by a row of padding that no real row sees: same loss and gradients,
    and the last MLP still runs at the kept positions only."""
    import copy

    assert not round_packed_lengths(lora(tiny_llama), 0)  # fp32 matmuls build no kernels: nothing to round
    plain = lora(tiny_llama).to(torch.bfloat16)
    rounded = copy.deepcopy(plain)
    assert mlp_at_kept_positions(plain) and mlp_at_kept_positions(rounded) and round_packed_lengths(rounded, 0)
    batch = Collator(0, pack=True)(varied_rows())
    length, kept = batch["input_ids"].shape[1], int(batch["logits_to_keep"].sum())
    lengths, mlp_rows = [], []
    rounded.get_input_embeddings().register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    last_mlp(rounded).register_forward_pre_hook(lambda m, args: mlp_rows.append(args[0].shape[-2]))
    loss_plain, grads_plain = loss_and_grads(plain, dict(batch))
    loss_rounded, grads_rounded = loss_and_grads(rounded, dict(batch))
    assert lengths == [rounded_length(length)] and rounded_length(length) > length and mlp_rows == [kept]
    assert loss_rounded == pytest.approx(loss_plain, rel=1e-3)
    for a, b in zip(grads_plain, grads_rounded):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_stay_in_the_heap_for_the_next_step():
    import resource

    def step():  # a step's activations: many blocks alive at once, then all freed
        alive = [np.ones(200_000 + 1000 * i, np.float32) for i in range(40)]
        del alive

    assert keep_freed_memory()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    # glibc's defaults return the blocks and fault them back in: ~85,000 page faults here
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000
