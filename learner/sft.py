"""Supervised fine-tuning on labeler demonstrations (paper section 3.5, "SFT"), with TRL's ``SFTTrainer``.

Each ``DemonstrationEvent`` becomes one example, tokenized here by ``learner.utils.encode_pair``: the event's
model input verbatim (the prompt contract, instructloop/prompt.py: raw text, or a chat already rendered by the
gateway with the assistant header) tokenized alone, as serve did, then the response and EOS (``<|im_end|>``
for a chat model); TRL puts the loss on the response only (``completion_mask``,
``completion_only_loss=True``). So SFT learns exactly the token ids PPO and the reward model later see
(``encode_sequence``); TRL's own prompt-completion path would tokenize prompt + completion as one string,
where tokens can merge across the boundary, and truncate from the right.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from learner.config import SFTConfig
from learner.utils import disable_dropout, encode_pair, left_pad, position_ids_from_mask

log = logging.getLogger(__name__)


def demonstrations_dataset(demonstrations: list, tokenizer, max_length: int):
    """A tokenized ``datasets.Dataset``: per demonstration, ``input_ids`` = ``encode_sequence`` of the stored
    model input and the response, and ``completion_mask`` = 1 on the response and its EOS."""
    from datasets import Dataset

    rows = []
    for demo in demonstrations:
        query, response = encode_pair(tokenizer, demo.prompt, demo.response, max_length)
        rows.append(
            {"input_ids": query + response, "completion_mask": [0] * len(query) + [1] * len(response)}
        )
    return Dataset.from_list(rows)


def run_sft(
    model_path: str | Path,
    demonstrations: list,
    output_dir: str | Path,
    config: SFTConfig,
    progress: bool = False,
) -> Path:
    """Fine-tune the causal LM at ``model_path`` on ``demonstrations``; save model + tokenizer to
    ``output_dir`` (plus ``sft_metrics.json``: train loss, steps, runtime) and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not demonstrations:
        raise ValueError("run_sft needs at least one demonstration")
    output_dir = Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = disable_dropout(AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32))
    trainer = build_sft_trainer(model, tokenizer, demonstrations, output_dir, config, progress)
    result = trainer.train()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    metrics = {
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "demonstrations": len(demonstrations),
    }
    (output_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("sft done", extra={"output_dir": str(output_dir), **metrics})
    return output_dir


def build_sft_trainer(
    model, tokenizer, demonstrations: list, output_dir: Path, config: SFTConfig, progress: bool = False
):
    """TRL's ``SFTTrainer`` over the tokenized demonstrations (``demonstrations_dataset``), loss on the
    response only; its state goes to ``output_dir / "trainer-state"``."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    args = TRLSFTConfig(
        output_dir=str(Path(output_dir) / "trainer-state"),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps
        max_length=config.max_length,
        completion_only_loss=True,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
    )
    return SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=demonstrations_dataset(demonstrations, tokenizer, config.max_length),
    )


@torch.no_grad()
def completion_nll(
    model, tokenizer, demonstrations: list, max_length: int = 512, batch_size: int = 8
) -> float:
    """Mean per-token negative log-likelihood of the demonstrations' responses (+ ``<|im_end|>``) given
    their queries: the quantity SFT minimises, measured independently of TRL."""
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, len(demonstrations), batch_size):
        sequences, response_lengths = [], []
        for demo in demonstrations[start : start + batch_size]:
            query, response = encode_pair(tokenizer, demo.prompt, demo.response, max_length)
            sequences.append(query + response)
            response_lengths.append(len(response))
        input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)  # (b, T)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits
        logp = (
            torch.log_softmax(logits[:, :-1].float(), -1)
            .gather(2, input_ids[:, 1:].unsqueeze(-1))
            .squeeze(-1)
        )
        width = input_ids.size(1)
        for row, n in enumerate(response_lengths):
            total_nll -= logp[row, width - 1 - n :].sum().item()
            total_tokens += n
    return total_nll / total_tokens
