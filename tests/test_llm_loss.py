"""The chunked causal LM loss (studio.llm_loss): transformers' loss and LoRA gradients without the full logits."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from studio.data.text import IGNORE
from studio.data.text_tokens import Example, collate, pack
from studio.llm_loss import causal_lm_loss, chunk_tokens, why_not_chunked

CHUNK = 7


class LargestLogits(TorchDispatchMode):
    """Records the most vocabulary-wide rows any tensor created inside it holds (views, such as the transposed
    LM head, are not new memory)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not func.is_view and t.dim() and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def assistant_only_packed_batch():
    """Two packed rows of samples whose first half is prompt (IGNORE labels), as the data pipeline builds them."""
    rng = random.Random(0)
    examples = []
    for n in (30, 50, 17, 80, 9):
        ids = [rng.randint(3, 250) for _ in range(n)]
        examples.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:], list(range(n))))
    return collate(pack(examples, 128), pad_id=0)


def lora_llama(demo, targets):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def lora_grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["q_proj", "lm_head"]])
def test_same_loss_and_lora_gradients_as_the_models_own_loss(demo, targets):
    batch = assistant_only_packed_batch()
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] == IGNORE).any()
    theirs, ours = lora_llama(demo, targets), lora_llama(demo, targets)
    expected = theirs(**batch, use_cache=False).loss
    expected.backward()
    vocab = ours.config.vocab_size
    with LargestLogits(vocab) as watch:
        loss = causal_lm_loss(ours, batch, chunk=CHUNK)
        loss.backward()
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert labelled > 10 * CHUNK and watch.rows == CHUNK  # forward and backward: one chunk's logits at a time
    assert abs(loss.item() - expected.item()) <= 1e-6
    grads, expected_grads = lora_grads(ours), lora_grads(theirs)
    assert any("lm_head" in name for name in grads) == ("lm_head" in targets)
    assert max((grads[n] - expected_grads[n]).abs().max().item() for n in grads) <= 1e-5
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_chunks_hold_a_bounded_number_of_logits():
    assert chunk_tokens(128_256) == 130 and chunk_tokens(32_000) == 524 and chunk_tokens(10**9) == 1


def test_models_that_transform_their_logits_keep_their_own_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8)
    with torch.device("meta"):
        assert why_not_chunked(LlamaForCausalLM(LlamaConfig(**tiny))) is None
        assert "final_logit_softcapping" in why_not_chunked(Gemma2ForCausalLM(Gemma2Config(**tiny)))
