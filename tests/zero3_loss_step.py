"""One DeepSpeed training step of a tiny Llama whose loss is ``fused_token_loss`` (run under torchrun).

Used by tests/test_losses_zero3.py: run once with ``--stage 0`` on one process and once with
``--stage 3`` on two, on the same global batch; rank 0 saves the global loss and the updated
parameters to ``--out`` for comparison.

Every rank builds the same model (seed 0) and the same global batch (seed 1). The batch is split
into groups of sequences; each group draws its OTR rollouts from its own generator seed, so the
one-process run (both groups) and the two-process run (one group per rank) draw the same tokens.
Each group's loss is a sum with weights 1 / (supervised tokens in the global batch); DeepSpeed
averages gradients over ranks, so each rank scales its loss by the world size, and the loss each
rank reports is averaged over ranks for the global figure.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 16, 1000
PROMPT_LEN = 5  # first positions of every sequence are not supervised
GROUP_SEEDS = (1000, 1001)
LOSS_OPTIONS = dict(k=8, temperature=1.3, beta=-0.1, baseline="none")


class FusedLossLlama(nn.Module):
    """Runs the decoder, then the fused loss on lm_head.weight (tied to the embeddings)."""

    def __init__(self, lm: nn.Module, objective: str):
        super().__init__()
        self.lm = lm
        self.objective = objective

    def forward(self, input_ids, targets, group_bounds, group_seeds, token_weight, loss_scale):
        from otr_cli.losses import fused_token_loss

        hidden = self.lm.model(input_ids=input_ids).last_hidden_state  # [b, T, H]
        total = hidden.new_zeros(())
        for (start, stop), seed in zip(group_bounds, group_seeds):
            rows = hidden[start:stop].reshape(-1, hidden.shape[-1])
            labels = targets[start:stop].reshape(-1)
            loss, _ = fused_token_loss(
                rows, self.lm.lm_head.weight, labels, objective=self.objective, **LOSS_OPTIONS, reduction="sum",
                weights=torch.full(labels.shape, token_weight), generator=torch.Generator().manual_seed(seed),
            )
            total = total + loss
        return total * loss_scale


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] and next-token targets [B, T] (-100 on prompt positions and the last one)."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    targets = torch.full_like(input_ids, -100)
    targets[:, PROMPT_LEN - 1 : -1] = input_ids[:, PROMPT_LEN:]
    return input_ids, targets


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=(0, 3), required=True)
    parser.add_argument("--objective", choices=("otr", "otr_exact"), default="otr")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = GLOBAL_BATCH // world
    groups_per_rank = len(GROUP_SEEDS) // world
    group_size = GLOBAL_BATCH // len(GROUP_SEEDS)

    input_ids, targets = global_batch()
    token_weight = 1.0 / int((targets != -100).sum())
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    group_bounds = [(g * group_size, (g + 1) * group_size) for g in range(groups_per_rank)]
    group_seeds = GROUP_SEEDS[rank * groups_per_rank : (rank + 1) * groups_per_rank]

    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
    }
    model = FusedLossLlama(tiny_llama(), args.objective)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(input_ids[mine], targets[mine], group_bounds, group_seeds, token_weight, float(world))
    engine.backward(loss)
    # Adam's first step is nearly scale-free (lr * sign(g)), so compare the gradients themselves too.
    params = list(engine.module.named_parameters())
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in params}
    engine.step()

    reported = loss.detach().clone()
    dist.all_reduce(reported)
    global_loss = float(reported) / world  # mean over ranks of world * (rank share) = global mean
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        state = {name: p.detach().clone() for name, p in params}
    if rank == 0:
        torch.save({"loss": global_loss, "params": state, "grads": grads, "world": world}, args.out)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
