"""Knowledge distillation from the full-precision fine-tuned model (paper: part of the critical initialization;
the exact loss is our choice): loss = (1-λ)·task + λ·T²·KL(teacher_T ‖ student_T) [+ β·MSE(hidden states)].

As in DeiT, the loss module wraps the task loss and owns the teacher: frozen, eval mode, run under no_grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def logits_of(outputs) -> list[torch.Tensor]:
    """The logits to distill: QA start/end logits, or `.logits` (CTC frames, classes), or a plain tensor."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if getattr(outputs, "start_logits", None) is not None:
        return [outputs.start_logits, outputs.end_logits]
    if getattr(outputs, "logits", None) is not None:
        return [outputs.logits]
    if isinstance(outputs, (tuple, list)):
        return [o for o in outputs if isinstance(o, torch.Tensor)]
    raise TypeError(f"cannot find logits in {type(outputs).__name__}")


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None):
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) over the last dim, averaged over positions. With a [B, L] bool `mask`:
    over each sequence's valid positions, then over the sequences that have one (choice, as CTC's "mean" reduction
    weighs utterances): every sample weighs the same whatever the micro-batches a global batch is cut into, where
    one mean over a micro-batch's frames gave its frames (of however many samples) the weight of its share."""
    T = temperature
    s = F.log_softmax(student.float() / T, dim=-1)
    t = F.log_softmax(teacher.float() / T, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is not None:
        mask = mask.bool()
        n = mask.sum(-1)
        per_seq = kl.masked_fill(~mask, 0).sum(-1) / n.clamp_min(1)  # masked_fill: an inf there stays out; 0 if none
        return per_seq.sum() / (n > 0).sum().clamp_min(1) * T * T
    return kl.mean() * T * T


class _Replay(nn.Module):
    """Stands in for a teacher submodule: returns the student module's last output when called with the same
    input tensor (the batch the student just saw), else runs the student's module, whose weights are the same."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.__dict__["source"] = source  # not a child: the weights stay the student's (state_dict, .to())
        self.last = None
        source.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.last = (args[0], output) if len(args) == 1 else None

    def forward(self, x):
        last, self.last = self.last, None
        if last is not None and last[0] is x:
            return last[1].detach()
        with torch.no_grad():
            out = self.source(x)
        self.last = None
        return out


class DistillationLoss(nn.Module):
    def __init__(self, teacher: nn.Module, lam: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"distillation weight lambda must be in [0, 1], got {lam}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.lam, self.temperature, self.hidden_weight = lam, temperature, hidden_weight

    def train(self, mode: bool = True):  # the teacher stays in eval mode whatever the trainer does
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_outputs(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)

    def share_frozen(self, student: nn.Module, name: str) -> bool:
        """Let the teacher reuse the student's output of submodule `name` (our choice, speed only: e.g. wav2vec2's
        conv feature encoder, frozen in fine-tuning and most of the teacher's forward) when the student holds it
        frozen with the teacher's exact weights and it has no train/eval-dependent layers, so the output is the
        same bit for bit. Returns False, changing nothing, otherwise."""
        mine, theirs = student.get_submodule(name), self.teacher.get_submodule(name)
        a, b = mine.state_dict(), theirs.state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)
        frozen = not any(p.requires_grad for p in mine.parameters())
        mode_free = not any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))
                            for m in mine.modules())
        if not (same and frozen and mode_free):
            return False
        parent, _, attr = name.rpartition(".")
        setattr(self.teacher.get_submodule(parent) if parent else self.teacher, attr, _Replay(mine))
        return True

    def forward(self, task_loss: torch.Tensor, student_out, teacher_out, mask: torch.Tensor | None = None):
        """`mask` ([B, L] bool) restricts sequence logits (e.g. CTC frames) to valid positions."""
        kd = sum(kd_kl(s, t, self.temperature, mask if s.dim() == 3 else None)
                 for s, t in zip(logits_of(student_out), logits_of(teacher_out))) / len(logits_of(student_out))
        loss = (1 - self.lam) * task_loss + self.lam * kd
        if self.hidden_weight > 0:
            sh, th = student_out.hidden_states, teacher_out.hidden_states
            if sh is None or th is None:
                raise ValueError("hidden_weight > 0 needs output_hidden_states=True for student and teacher")
            mse = sum(F.mse_loss(a.float(), b.float()) for a, b in zip(sh, th)) / len(sh)
            loss = loss + self.hidden_weight * mse
        return loss
