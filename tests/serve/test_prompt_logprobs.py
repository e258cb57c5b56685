"""``PolicyModel.prompt_logprobs`` (TGI's ``decoder_input_details``) against a plain HF forward, over a prompt
longer than one float32 block (``PROMPT_LOGPROBS_ROWS``), so the blocks join without a gap or an overlap."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from serve.model import PROMPT_LOGPROBS_ROWS, PolicyModel


@torch.inference_mode()
def test_prompt_logprobs_match_an_hf_forward(varied_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32).eval()
    policy = PolicyModel("base", model, tokenizer, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (2 * PROMPT_LOGPROBS_ROWS + 37,), generator=generator).tolist()
    logprobs, top = policy.prompt_logprobs(ids, top_n=3)
    expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    assert logprobs[0] is None and top[0] == [] and len(logprobs) == len(top) == len(ids)
    torch.testing.assert_close(
        torch.tensor(logprobs[1:]), expected.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    )
    torch.testing.assert_close(
        torch.tensor([[t.logprob for t in row] for row in top[1:]]), expected.topk(3, dim=-1).values
    )
    assert [[t.id for t in row] for row in top[1:]] == expected.topk(3, dim=-1).indices.tolist()
