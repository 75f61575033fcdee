"""What GRPO reports (``tasks/grpo.py``): held-out rewards streamed per evaluation
(:class:`GrpoMetrics`), the training rollouts' figures per log interval and in total
(:class:`RolloutStats`), and the engine callback that writes them into the log and
metrics.jsonl and keeps the totals across a resume (:class:`RolloutLog`)."""

from __future__ import annotations

import torch

from ..engine.callbacks import METRICS, Callback



class GrpoMetrics:
    """Held-out rewards (mean, per reward), KL to the reference, completion length and the
    fraction of completions that stopped, streamed batch by batch."""

    def __init__(self, names: list[str], on_compute=None):
        self.names, self.on_compute = names, on_compute
        self.n, self.kl_n = 0, 0
        self.sums = torch.zeros(3 + len(names), dtype=torch.float64)  # reward, tokens, stopped, per reward
        self.kl = 0.0

    def update(self, logits, labels, *, loss_sum, count, index=None) -> None:
        rows = logits.double().cpu()  # (B, 4 + R): reward, kl, tokens, stopped, per reward
        self.n += len(rows)
        self.sums += rows[:, [0, 2, 3, *range(4, rows.shape[1])]].sum(0)
        if not torch.isnan(rows[:, 1]).any():
            self.kl += float(rows[:, 1].sum())
            self.kl_n += len(rows)

    def compute(self) -> dict:
        n = max(self.n, 1)
        mean = (self.sums / n).tolist()
        out = {"reward": round(mean[0], 6), **{f"reward_{k}": round(v, 6) for k, v in zip(self.names, mean[3:])}}
        if self.kl_n:
            out["kl"] = round(self.kl / self.kl_n, 6)
        out.update(completion_tokens=round(mean[1], 3), stopped=round(mean[2], 4), prompts=self.n)
        if self.on_compute is not None:
            self.on_compute(out)
        return out


class RolloutStats:
    """What the training rollouts did since the last log line, and in total (kept across resumes)."""

    SUMS = ("completions", "reward", "reward_sq", "kl", "kl_tokens", "completion_tokens", "stopped", "groups",
            "flat_groups", "rollout_s", "reference_s")

    def __init__(self, names: list[str]):
        self.names = names
        self.totals = {"rollout_s": 0.0, "reference_s": 0.0, "update_s": 0.0, "completions": 0,
                       "completion_tokens": 0, "steps_logged": 0}
        self.reset()

    def reset(self) -> None:
        self.now = dict.fromkeys(self.SUMS, 0.0)
        self.per_reward = [0.0] * len(self.names)

    def add(self, total: torch.Tensor, each: torch.Tensor, advantages_flat: int, groups: int, tokens: list[int],
            stopped: int, kl_sum: float | None, kl_tokens: int, rollout_s: float, reference_s: float) -> None:
        now = self.now
        now["completions"] += len(total)
        now["reward"] += float(total.sum())
        now["reward_sq"] += float((total ** 2).sum())
        now["completion_tokens"] += sum(tokens)
        now["stopped"] += stopped
        now["groups"] += groups
        now["flat_groups"] += advantages_flat
        if kl_sum is not None:
            now["kl"] += kl_sum
            now["kl_tokens"] += kl_tokens
        now["rollout_s"] += rollout_s
        now["reference_s"] += reference_s
        self.per_reward = [a + float(b) for a, b in zip(self.per_reward, each.sum(0))]

    def drain(self, interval_s: float, eval_s: float) -> dict | None:
        """The figures since the last call (None when nothing was sampled), added to the totals."""
        now, n = self.now, self.now["completions"]
        if not n:
            return None
        mean = now["reward"] / n
        update_s = max(0.0, interval_s - eval_s - now["rollout_s"] - now["reference_s"])
        out = {"reward": round(mean, 6), "reward_std": round(max(0.0, now["reward_sq"] / n - mean ** 2) ** 0.5, 6),
               **{f"reward_{k}": round(v / n, 6) for k, v in zip(self.names, self.per_reward)}}
        if now["kl_tokens"]:
            out["kl"] = round(now["kl"] / now["kl_tokens"], 6)
        out.update(completion_tokens=round(now["completion_tokens"] / n, 3), stopped=round(now["stopped"] / n, 4),
                   flat_groups=round(now["flat_groups"] / max(now["groups"], 1), 4), completions=int(n),
                   rollout_s=round(now["rollout_s"], 3), reference_s=round(now["reference_s"], 3),
                   update_s=round(update_s, 3),
                   rollout_tokens_per_s=round(now["completion_tokens"] / max(now["rollout_s"], 1e-9), 1))
        t = self.totals
        t["rollout_s"] += now["rollout_s"]
        t["reference_s"] += now["reference_s"]
        t["update_s"] += update_s
        t["completions"] += int(n)
        t["completion_tokens"] += int(now["completion_tokens"])
        t["steps_logged"] += 1
        self.reset()
        return out

    def summary(self) -> dict:
        t = self.totals
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in t.items()}


class RolloutLog(Callback):
    """Per log interval: the training rewards, KL, lengths, and rollout vs update time, into the
    log and metrics.jsonl (``{"event": "rollout", ...}``); the totals survive a resume. Before the
    first step of a new run, the baseline evaluation as ``{"event": "baseline", ...}``.

    METRICS order: before the resumable checkpoint (its state is saved with the step) and, at
    the start, after MFU's counting forward pass (which samples a rollout: not counted here)."""

    order = METRICS

    def __init__(self, task, log):
        self.task, self.log = task, log
        self.eval_s = 0.0

    def on_fit_start(self, trainer) -> None:
        self.task.stats.reset()  # MFU counted FLOPs on one rollout: not a training step's
        self.eval_s = 0.0
        if trainer.state.step == 0 and self.task.before is not None:
            trainer.record({"event": "baseline", "split": "validation", "step": 0, **self.task.before})

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.eval_s += float(metrics.get("eval_seconds", 0.0))  # inside the next log interval: not update time

    def on_log(self, trainer, logs: dict) -> None:
        figures = self.task.stats.drain(logs["interval"]["seconds"], self.eval_s)
        self.eval_s = 0.0
        if figures is None:
            return
        trainer.record({"event": "rollout", "step": logs["step"], **figures})
        parts = ", ".join(f"{k.removeprefix('reward_')} {v:.3f}" for k, v in figures.items()
                          if k.startswith("reward_") and k != "reward_std")
        kl = f", kl {figures['kl']:.4f}" if "kl" in figures else ""
        self.log(f"step {logs['step']}: reward {figures['reward']:.3f} ({parts}){kl}, "
                 f"{figures['completion_tokens']:.1f} tokens/completion; rollout {figures['rollout_s']:.1f}s, "
                 f"reference {figures['reference_s']:.1f}s, update {figures['update_s']:.1f}s")

    def state_dict(self) -> dict:
        return {"totals": dict(self.task.stats.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.task.stats.totals.update(state["totals"])


