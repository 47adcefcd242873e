"""kto's reference point z over 2 gloo ranks: the mean log-ratio of both ranks' mismatched rows, as TRL gathers
its KL estimate, not each rank's own micro-batch's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaletune.config import load_config
from scaletune.tasks.dpo import answer_logps
from scaletune.tasks.kto import _rows
from scaletune.train import setup

pytestmark = pytest.mark.distributed


def _mismatched_log_ratios(model, batch: dict, n: int) -> torch.Tensor:
    """Policy minus reference log-probability of the batch's mismatched rows (none for one example)."""
    if n == 1:
        return torch.zeros(0)
    rows = _rows(batch, slice(n, None))
    policy = answer_logps(model, rows)
    with model.disable_adapter():
        return policy - answer_logps(model, rows)


@pytest.mark.parametrize("sizes", [(3, 2), (3, 1)])
def test_z_is_the_mean_over_both_ranks_mismatched_rows(make_config, tmp_path, sizes):
    """(3, 2): z on both ranks is that of all 5 mismatched rows, where each rank's own differs; (3, 1): a rank
    with one example (an eval's last micro-batch) adds no row but still joins, and shares rank 0's z."""
    import forking
    import stutil

    run, _ = setup(load_config(make_config("kto")))
    model = run.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # (a moved adapter: the policy is no longer the reference, so z > 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    examples = [run.data["train"][i] for i in range(sum(sizes))]
    pad = run.tokenizer.pad_token_id
    batches = [run.task.collate(examples[:sizes[0]], pad), run.task.collate(examples[sizes[0]:], pad)]
    torch.save({"model": model, "batches": batches}, tmp_path / "inputs.pt")
    forking.run_ranks(Path(__file__).with_name("kto_kl_worker.py"), [str(tmp_path)], stutil.child_env(), 2,
                      tmp_path, timeout=240)
    with torch.no_grad():
        union = torch.cat([_mismatched_log_ratios(model, b, n) for b, n in zip(batches, sizes)]).mean().clamp(min=0)
        own = [run.task.loss_sum(model, b) for b in batches]  # (one process: each micro-batch's own z)
    beta = run.task._beta
    for rank, n in enumerate(sizes):
        loss, out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out[:, 2], union.expand(n), rtol=1e-5, atol=1e-6)
        rewards, desirable = out[:, 0], out[:, 1].bool()
        torch.testing.assert_close(rewards, own[rank][1][:, 0])  # (the rewards are no rank's business)
        expected = torch.where(desirable, 1 - torch.sigmoid(rewards - beta * union),
                               1 - torch.sigmoid(beta * union - rewards)).sum()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # (what each rank's own micro-batch gave: rank 0's, or rank 1's 0 alone with one example, is not the union's)
    assert union > 1e-3 and own[1][1][0, 2] != union
    assert own[1][1][0, 2] == 0 if sizes[1] == 1 else abs(own[0][1][0, 2] - union) > 1e-4
