"""A gallery of knowledge-distillation losses written the way public code bases write them, each with
the diagnosis ``minikd.diagnose`` must give it. Data for tests, no tests here: ``from diagnose_gallery
import GALLERY`` (pytest puts tests/ on sys.path).

Each function is written from the public definition it names (Hinton et al. 2015; torchdistill's
``KDLoss``, RepDistiller's ``DistillKL``, mdistiller's ``kd_loss``, TRL's ``generalized_jsd_loss``,
Liger-Kernel's TVD, optax's ``kl_divergence`` / ``softmax_cross_entropy``), correct or with a bug
people ship. The diagnoser probes ``fn(student_logits, teacher_logits, labels)`` with float64 inputs.

Entry fields
------------
name        unique id
needs       "torch" | "jax" | None (NumPy only). Entries whose framework does not import are left
            out of GALLERY and listed in SKIPPED as (name, needs).
fn          the callable; with ``module_init`` an ``nn.Module`` class to instantiate first
order       the positional roles of fn's arguments: "student", "teacher", "labels" (no "labels":
            fn takes none)
teacher_as  what fn's teacher argument is: "logits", or "probs" / "log_probs" = softmax(t) /
            log_softmax(t) at T = 1, computed by the diagnoser from its teacher logits t
fixed       keyword arguments the diagnoser passes on every call
module_init keyword arguments to instantiate fn with (fn is then an nn.Module class), else None
sequence    True: probe with (B, S, C) logits (and (B, S) labels) too; ``expect`` describes what the
            (B, S, C) probe finds (the (N, C) probe agrees except where ``why`` says otherwise)
returns     "loss" (default), or "loss_and_grad": fn returns (loss, d loss / d student) (NumPy)
exact       True: on finite logits and labels without -100, fn's value and student gradient equal one
            ``minikd.kd_loss`` / ``kd_loss_and_grad`` call on the same arguments, with
            shape-independent options (kind, T, alpha, hard_weight, scale_t2, reduction "batchmean"
            / "sum" / "none", label_smoothing, teacher_as, beta), to 1e-10 in float64
expect      the diagnosis keys this entry must get; keys that are not determined are omitted; None
            is the diagnoser's null (t_squared at T = 1, ignore_index_honored without labels)
why         one line: what the function is and where its convention comes from

Verified (a scratch script, not committed): every expectation that has a minikd form was checked
against ``minikd.kd_loss_and_grad`` in float64 on random inputs -- exact entries to 1e-10 in value and
gradient; elementwise_mean, batch_axis_mean, teacher-/student-only temperature through the equivalent
minikd call (alpha rescaled by 1/C or S, teacher passed as probabilities); ignore_index_honored by
comparing fn on a batch with -100 rows against fn on the batch without them; neg_inf_safe by padding
both logits with -inf classes and comparing against the unpadded call; gradient_exact against central
finite differences of fn's own value.
"""
from __future__ import annotations

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:   # the torch entries are left out (SKIPPED)
    torch = None

try:
    import jax
    jax.config.update("jax_enable_x64", True)   # the diagnoser probes in float64
    import jax.numpy as jnp
except ImportError:   # the JAX entries are left out (SKIPPED)
    jax = None

__all__ = ["GALLERY", "SKIPPED", "ALL_NAMES"]

IGNORE = -100

# What a textbook Hinton loss (T = 4, alpha = 0.9) must be diagnosed as; entries override keys.
HINTON = {"divergence": "forward_kl", "temperature": 4.0, "temperature_on": "both", "t_squared": True,
          "alpha": 0.9, "hard_term": "ce", "reduction": "batchmean", "ignore_index_honored": False,
          "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": True}


def _entry(name, needs, fn, expect, why, *, order=("student", "teacher", "labels"), teacher_as="logits",
           fixed=None, module_init=None, sequence=False, exact=True, returns="loss"):
    return dict(name=name, needs=needs, fn=fn, order=list(order), teacher_as=teacher_as, fixed=dict(fixed or {}),
                module_init=module_init, sequence=sequence, exact=exact, returns=returns, expect=dict(expect), why=why)


def _hinton(**changes):
    out = dict(HINTON)
    out.update(changes)
    return out


_TORCH, _JAX, _NUMPY = [], [], []

# =====================================================================================================
# PyTorch
# =====================================================================================================
if torch is not None:

    # 1. Hinton, as most repositories write it: batchmean KL at T, times T^2, plus CE at T = 1.
    # F.cross_entropy drops -100 rows, the KL does not: ignore_index is not honored.
    def hinton_kd(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        soft_targets = F.softmax(teacher_logits / T, dim=-1)
        log_student = F.log_softmax(student_logits / T, dim=-1)
        distill = F.kl_div(log_student, soft_targets, reduction="batchmean")
        return alpha * T * T * distill + (1.0 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "hinton_torch", "torch", hinton_kd, HINTON,
        "Hinton KD as written everywhere: alpha T^2 KL(q||p) batchmean + (1-alpha) CE; the KL term still "
        "counts rows labeled -100 (only F.cross_entropy drops them), and kl_div gives NaN on -inf padding"))

    # Hinton with the ignored rows dropped from both terms before anything is computed.
    def hinton_kd_masked(student_logits, teacher_logits, labels, T=4.0, alpha=0.9, ignore_index=IGNORE):
        keep = labels != ignore_index
        s, t, y = student_logits[keep], teacher_logits[keep], labels[keep]
        kd = F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean")
        ce = F.cross_entropy(s, y)
        return alpha * (T ** 2) * kd + (1 - alpha) * ce

    _TORCH.append(_entry(
        "hinton_torch_masked", "torch", hinton_kd_masked, _hinton(ignore_index_honored=True),
        "Hinton KD with rows labeled -100 selected away first (LLM-style masking): they count nowhere"))

    # 2. reduction="mean" on F.kl_div: divides the summed KL by B*C, a loss C times too small.
    def kd_mean_reduction(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                      reduction="mean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "kl_reduction_mean", "torch", kd_mean_reduction, _hinton(reduction="elementwise_mean"),
        "F.kl_div(reduction='mean') (nn.KLDivLoss()'s default): the soft term is divided by B*C, not B",
        exact=False))

    # 3. the T^2 factor forgotten.
    def kd_no_t2(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kl = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                      reduction="batchmean")
        return alpha * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "missing_t2", "torch", kd_no_t2, _hinton(t_squared=False),
        "Hinton KD without the T^2 factor: the soft gradient shrinks as 1/T (minikd scale_t2=False)"))

    # 4. F.kl_div's arguments swapped: kl_div(input=log q, target=p) = KL(p || q), the reverse KL.
    def kd_swapped(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kl = F.kl_div(F.log_softmax(teacher_logits / T, dim=-1), F.softmax(student_logits / T, dim=-1),
                      reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "kl_direction_swapped", "torch", kd_swapped, _hinton(divergence="reverse_kl"),
        "F.kl_div(log teacher, student probs): KL(p_student || q_teacher), the reverse KL, by argument swap"))

    # 5. temperature on the teacher only.
    def kd_teacher_temperature_only(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kl = F.kl_div(F.log_softmax(student_logits, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "temperature_teacher_only", "torch", kd_teacher_temperature_only, _hinton(temperature_on="teacher_only"),
        "the student's log_softmax forgets /T: KL(softmax(t/T) || softmax(s)), times T^2", exact=False))

    # temperature on the student only (the teacher's softmax forgets /T).
    def kd_student_temperature_only(student_logits, teacher_logits, labels, T=2.0, alpha=0.5):
        kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits, -1), reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "temperature_student_only", "torch", kd_student_temperature_only,
        _hinton(temperature=2.0, temperature_on="student_only", alpha=0.5),
        "the teacher's softmax forgets /T: KL(softmax(t) || softmax(s/T)), T = 2, times T^2", exact=False))

    # 6. log(softmax + eps) instead of log_softmax.
    def kd_log_eps(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        log_p = torch.log(F.softmax(student_logits / T, dim=-1) + 1e-8)
        kl = F.kl_div(log_p, F.softmax(teacher_logits / T, dim=-1), reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "log_softmax_eps", "torch", kd_log_eps,
        _hinton(eps_smoothing=True, neg_inf_safe=True),
        "torch.log(softmax(s/T) + 1e-8) for the student's log-probabilities: off by ~1e-7 absolute at T = 4; "
        "-inf padding is harmless here (log(0 + eps) is finite, so kl_div has no 0 * -inf)", exact=False))

    # 7. alpha on the other term.
    def kd_alpha_on_ce(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                      reduction="batchmean")
        return (1 - alpha) * T * T * kl + alpha * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "alpha_on_hard_term", "torch", kd_alpha_on_ce, _hinton(alpha=0.1),
        "alpha=0.9 written on the CE term, (1-alpha) T^2 KL + alpha CE: minikd's alpha is 0.1"))

    # 8. token-level KD: nn.CrossEntropyLoss(ignore_index=-100) drops rows, the per-row KL mean does not.
    _ce_ignore = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def token_kd_unmasked_kl(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        C = student_logits.size(-1)
        s, t = student_logits.view(-1, C), teacher_logits.view(-1, C)
        per_token = F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="none").sum(-1)
        return alpha * T ** 2 * per_token.mean() + (1 - alpha) * _ce_ignore(s, labels.view(-1))

    _TORCH.append(_entry(
        "ignore_index_kl_all_rows", "torch", token_kd_unmasked_kl, HINTON,
        "CrossEntropyLoss(ignore_index=-100) honors padding, the per-token KL mean does not: rows labeled "
        "-100 still get the soft term"))

    # masked KL sum, but divided by every row (the mean's denominator still counts ignored rows).
    def kd_masked_wrong_denominator(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        mask = (labels != IGNORE).to(student_logits.dtype)
        kl_rows = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1),
                           reduction="none").sum(-1)
        ce_rows = F.cross_entropy(student_logits, labels, ignore_index=IGNORE, reduction="none")
        rows = alpha * T * T * kl_rows + (1 - alpha) * ce_rows
        return (rows * mask).sum() / student_logits.shape[0]

    _TORCH.append(_entry(
        "masked_wrong_denominator", "torch", kd_masked_wrong_denominator, HINTON,
        "rows labeled -100 are masked out of the sum but still counted in the mean's denominator"))

    # a hand-written CE through F.one_hot: a -100 label raises.
    def kd_onehot_ce(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        n_classes = student_logits.shape[-1]
        target = F.one_hot(labels, n_classes).to(student_logits.dtype)
        ce = -(target * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()
        kd = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
        return alpha * T * T * kd + (1 - alpha) * ce

    _TORCH.append(_entry(
        "onehot_ce_crashes_on_ignore", "torch", kd_onehot_ce, HINTON,
        "CE written with F.one_hot(labels): a -100 label raises (counts as not honoring ignore_index)"))

    # 9. TRL-style generalized JSD (beta: the teacher's weight in the mixture), labels as a mask only.
    def generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
        log_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        if beta == 0:        # endpoint: forward KL(teacher || student)
            per_class = F.kl_div(log_s, log_t, reduction="none", log_target=True)
        elif beta == 1:      # endpoint: reverse KL(student || teacher)
            per_class = F.kl_div(log_t, log_s, reduction="none", log_target=True)
        else:
            b = torch.tensor(beta, dtype=log_s.dtype)
            # log m = log((1 - beta) p + beta q), in log space
            log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
            per_class = (b * F.kl_div(log_m, log_t, reduction="none", log_target=True)
                         + (1 - b) * F.kl_div(log_m, log_s, reduction="none", log_target=True))
        per_token = per_class.sum(-1)
        if labels is None:
            return per_token.mean()
        keep = labels != IGNORE
        return per_token[keep].sum() / keep.sum()

    _TORCH.append(_entry(
        "trl_generalized_jsd", "torch", generalized_jsd,
        {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "temperature_on": "none", "t_squared": None,
         "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True,
         "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": True},
        "TRL generalized_jsd_loss: m = (1-beta) p + beta q via logsumexp, beta KL(q||m) + (1-beta) KL(p||m), "
        "labels only mask tokens; kl_div(log_target=True) is NaN where both sides are -inf",
        sequence=True))

    # 10. JSD with the mixture weights swapped relative to the KL weights.
    def jsd_mixture_swapped(student_logits, teacher_logits, labels, beta=0.2):
        p = F.softmax(student_logits, dim=-1)
        q = F.softmax(teacher_logits, dim=-1)
        m = beta * p + (1 - beta) * q          # bug: TRL's mixture puts beta on the teacher
        log_m = torch.log(m)
        kl_q_m = (q * (torch.log(q) - log_m)).sum(-1)
        kl_p_m = (p * (torch.log(p) - log_m)).sum(-1)
        per_row = beta * kl_q_m + (1 - beta) * kl_p_m
        keep = (labels != IGNORE).to(per_row.dtype)
        return (per_row * keep).sum() / keep.sum()

    _TORCH.append(_entry(
        "jsd_mixture_swapped", "torch", jsd_mixture_swapped,
        {"divergence": "unknown", "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True,
         "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": True},
        "beta=0.2 with m = beta p + (1-beta) q but TRL's KL weights beta KL(q||m) + (1-beta) KL(p||m): the "
        "mixture is minikd's JSD(0.8), the weights JSD(0.2); no c * JSD(beta) equals it (nearest: about "
        "2 * JSD(0.5), off by 1-9% per row, the factor drifting from 2.08 to 1.94 as the logits spread)",
        exact=False))

    # 11. Liger-style total variation distance, mean over the rows that count.
    def tvd_loss(student_logits, teacher_logits, labels):
        p = torch.softmax(student_logits, dim=-1)
        q = torch.softmax(teacher_logits, dim=-1)
        tv = 0.5 * torch.abs(p - q).sum(dim=-1)
        valid = labels != IGNORE
        return tv[valid].sum() / valid.sum()

    _TORCH.append(_entry(
        "liger_tvd", "torch", tvd_loss,
        {"divergence": "tvd", "temperature": 1.0, "temperature_on": "none", "t_squared": None, "alpha": 1.0,
         "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True, "neg_inf_safe": True,
         "eps_smoothing": False, "gradient_exact": True},
        "Liger-Kernel's TVD: 0.5 sum|p - q| per row, batchmean over rows whose label is not -100"))

    # 12. soft cross-entropy (Hinton's formula, without the teacher's entropy).
    def kd_soft_cross_entropy(student_logits, teacher_logits, labels, T=2.0, alpha=0.7):
        soft_targets = torch.softmax(teacher_logits / T, dim=1)
        soft_ce = -(soft_targets * torch.log_softmax(student_logits / T, dim=1)).sum(dim=1).mean() * T * T
        return alpha * soft_ce + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "soft_cross_entropy", "torch", kd_soft_cross_entropy,
        _hinton(divergence="soft_ce", temperature=2.0, alpha=0.7),
        "-(softmax(t/T) * log_softmax(s/T)).sum(-1).mean() * T^2: cross-entropy with the soft targets "
        "(KL plus the teacher's entropy; same gradient), T = 2, alpha = 0.7"))

    # 13. label smoothing on the hard term.
    def kd_label_smoothing(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kd = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                      reduction="batchmean")
        hard = F.cross_entropy(student_logits, labels, label_smoothing=0.1)
        return alpha * T * T * kd + (1 - alpha) * hard

    _TORCH.append(_entry(
        "label_smoothed_hard_term", "torch", kd_label_smoothing,
        _hinton(hard_term="label_smoothed_ce", label_smoothing=0.1),
        "Hinton KD whose hard term is F.cross_entropy(label_smoothing=0.1) (PyTorch's definition)"))

    # 14. both terms summed over the batch.
    def kd_sum(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kd = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="sum")
        return alpha * T * T * kd + (1 - alpha) * F.cross_entropy(student_logits, labels, reduction="sum")

    _TORCH.append(_entry(
        "reduction_sum", "torch", kd_sum, _hinton(reduction="sum"),
        "kl_div(reduction='sum') and cross_entropy(reduction='sum'): the batch's sum"))

    # 15. (B, S, C) logits straight into batchmean: divides by B, not by the B*S tokens.
    def seq_kd_batchmean(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kd = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                      reduction="batchmean")
        n_classes = student_logits.size(-1)
        ce = F.cross_entropy(student_logits.reshape(-1, n_classes), labels.reshape(-1))
        return alpha * T ** 2 * kd + (1 - alpha) * ce

    _TORCH.append(_entry(
        "sequence_batchmean_unflattened", "torch", seq_kd_batchmean, _hinton(reduction="batch_axis_mean"),
        "(B, S, C) logits into kl_div(reduction='batchmean'): divides by B, a soft term S times too large "
        "(on (N, C) input it is plain batchmean)", sequence=True, exact=False))

    # 16. the student detached inside the soft term: right value, only CE's gradient.
    def kd_detached(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        log_p = F.log_softmax(student_logits.detach() / T, dim=-1)
        kd = F.kl_div(log_p, F.softmax(teacher_logits / T, dim=-1), reduction="batchmean")
        return alpha * T * T * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "student_detached", "torch", kd_detached, _hinton(gradient_exact=False),
        "student_logits.detach() in the soft term (copied from the teacher line): the value is right, "
        "autograd returns only the CE gradient", exact=False))

    # 17a. KL written by hand with q.log(): 0 * -inf = NaN where the teacher has -inf classes.
    def kd_manual_log(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        q = F.softmax(teacher_logits / T, dim=-1)
        log_p = F.log_softmax(student_logits / T, dim=-1)
        kl = (q * (q.log() - log_p)).sum(-1).mean()
        return alpha * T ** 2 * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "kl_manual_log_nan", "torch", kd_manual_log, HINTON,
        "KL as (q * (q.log() - log_p)).sum(-1): q = 0 on padded vocabulary gives 0 * -inf = NaN"))

    # 17b. the -inf-safe version: masked where q = 0, rows labeled -100 dropped.
    def kd_where_safe(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        log_p = F.log_softmax(student_logits / T, dim=-1)
        log_q = F.log_softmax(teacher_logits / T, dim=-1)
        q = log_q.exp()
        kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
        valid = labels != IGNORE
        n = valid.sum().clamp(min=1)
        ce_sum = F.cross_entropy(student_logits, labels, ignore_index=IGNORE, reduction="sum")
        return (alpha * T * T * kl[valid].sum() + (1 - alpha) * ce_sum) / n

    _TORCH.append(_entry(
        "kl_where_safe", "torch", kd_where_safe, _hinton(ignore_index_honored=True, neg_inf_safe=True),
        "KL with torch.where(q > 0, q (log q - log p), 0) and -100 rows masked: finite on -inf padding, "
        "the reference behaviour (note F.kl_div is NaN there even with log_target=True)"))

    # 18. torchdistill-like module: ITS alpha weights the hard term, beta = 1 - alpha the soft one.
    class DistillKLWithCE(nn.KLDivLoss):
        def __init__(self, temperature, alpha=None, beta=None, reduction="batchmean"):
            super().__init__(reduction=reduction)
            self.temperature = temperature
            self.alpha = alpha
            self.beta = beta if beta is not None else 1 - alpha
            self.ce = nn.CrossEntropyLoss(reduction="mean" if reduction == "batchmean" else reduction)

        def forward(self, student_logits, teacher_logits, targets=None):
            T = self.temperature
            soft = super().forward(torch.log_softmax(student_logits / T, dim=1), torch.softmax(teacher_logits / T, dim=1))
            if targets is None or not self.alpha:
                return soft
            return self.alpha * self.ce(student_logits, targets) + self.beta * T ** 2 * soft

    _TORCH.append(_entry(
        "torchdistill_module", "torch", DistillKLWithCE, _hinton(alpha=0.1),
        "torchdistill-style KDLoss(nn.KLDivLoss): alpha * CE + (1 - alpha) * T^2 KL, so its alpha=0.9 "
        "is minikd's alpha 0.1", module_init={"temperature": 4.0, "alpha": 0.9}))

    # RepDistiller-style DistillKL: a module, two arguments, summed KL / batch size.
    class DistillKL(nn.Module):
        def __init__(self, T):
            super().__init__()
            self.T = T

        def forward(self, y_s, y_t):
            log_ps = F.log_softmax(y_s / self.T, dim=1)
            pt = F.softmax(y_t / self.T, dim=1)
            return F.kl_div(log_ps, pt, reduction="sum") * (self.T ** 2) / y_s.shape[0]

    _TORCH.append(_entry(
        "repdistiller_distillkl", "torch", DistillKL,
        _hinton(alpha=1.0, hard_term="none", ignore_index_honored=None),
        "RepDistiller DistillKL(T): KL summed then / batch size (= batchmean), times T^2; no labels",
        order=("student", "teacher"), module_init={"T": 4.0}))

    # mdistiller-style: reduction='none', sum over classes, mean over rows, weights per term.
    def _kd_term(logits_student, logits_teacher, temperature):
        log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
        pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
        loss = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
        return loss * temperature ** 2

    def mdistiller_kd(logits_student, logits_teacher, target, temperature=4.0, ce_weight=1.0, kd_weight=1.0):
        loss_ce = ce_weight * F.cross_entropy(logits_student, target)
        loss_kd = kd_weight * _kd_term(logits_student, logits_teacher, temperature)
        return loss_ce + loss_kd

    _TORCH.append(_entry(
        "mdistiller_weights", "torch", mdistiller_kd, _hinton(alpha=1.0, hard_weight=1.0),
        "mdistiller-style CE_WEIGHT * CE + KD_WEIGHT * T^2 KL with both weights 1.0: alpha 1, hard_weight 1 "
        "(t_squared True is the reading with alpha in [0, 1]; alpha 16 without T^2 gives the same loss)"))

    # per-sample losses (reduction='none' kept to the end).
    def kd_per_sample(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="none").sum(-1)
        ce = F.cross_entropy(student_logits, labels, reduction="none")
        return alpha * T * T * kl + (1 - alpha) * ce

    _TORCH.append(_entry(
        "reduction_none", "torch", kd_per_sample, _hinton(reduction="none"),
        "per-row losses for a weighted/sampled mean done by the caller; a -100 row keeps its KL"))

    # 19. arguments in another order.
    def kd_teacher_first(teacher_logits, student_logits, labels, T=2.0, alpha=0.5):
        kd = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                      reduction="batchmean")
        return alpha * T * T * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "teacher_first_order", "torch", kd_teacher_first, _hinton(temperature=2.0, alpha=0.5),
        "Hinton KD with the signature fn(teacher_logits, student_logits, labels), T = 2, alpha = 0.5",
        order=("teacher", "student", "labels")))

    # 20. keyword arguments the user fixes (the defaults are not what is used).
    def kd_with_options(student_logits, teacher_logits, labels, T=2.0, alpha=0.5):
        kd = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                      reduction="batchmean") * (T * T)
        return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "fixed_keyword_arguments", "torch", kd_with_options, _hinton(temperature=3.0, alpha=0.7),
        "Hinton KD called as fn(s, t, y, T=3.0, alpha=0.7) (defaults T=2, alpha=0.5 unused)",
        fixed={"T": 3.0, "alpha": 0.7}))

    # 21. teacher given as probabilities (soft labels cached from a teacher run at T = 1).
    def kd_from_soft_labels(student_logits, teacher_probs, labels, alpha=0.5):
        kd = F.kl_div(F.log_softmax(student_logits, dim=-1), teacher_probs, reduction="batchmean")
        return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "teacher_as_probs", "torch", kd_from_soft_labels,
        _hinton(temperature=1.0, temperature_on="none", t_squared=None, alpha=0.5),
        "offline KD from cached teacher probabilities at T = 1: alpha KL(q||p) + (1-alpha) CE",
        teacher_as="probs"))

    # 22. pure KD, no labels.
    def kd_pure(student_logits, teacher_logits, T=2.0):
        return F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1),
                        reduction="batchmean") * T ** 2

    _TORCH.append(_entry(
        "no_labels", "torch", kd_pure,
        _hinton(temperature=2.0, alpha=1.0, hard_term="none", ignore_index_honored=None),
        "pure distillation fn(s, t): T^2 KL(q||p) batchmean, T = 2, no hard term",
        order=("student", "teacher")))

# =====================================================================================================
# JAX
# =====================================================================================================
if jax is not None:

    # (a) Hinton in JAX, -inf safe (masked where q = 0) and honoring ignore_index.
    def hinton_kd_jax(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        log_p = jax.nn.log_softmax(student_logits / T, axis=-1)
        log_q = jax.nn.log_softmax(teacher_logits / T, axis=-1)
        q = jnp.exp(log_q)
        kl = jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=-1)
        valid = labels != IGNORE
        safe_labels = jnp.where(valid, labels, 0)
        log_p1 = jax.nn.log_softmax(student_logits, axis=-1)
        ce = -jnp.take_along_axis(log_p1, safe_labels[:, None], axis=-1)[:, 0]
        per_row = alpha * T ** 2 * kl + (1 - alpha) * ce
        return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    _JAX.append(_entry(
        "hinton_jax", "jax", hinton_kd_jax, _hinton(ignore_index_honored=True, neg_inf_safe=True),
        "Hinton KD in jax.numpy with jnp.where(q > 0, ...) and a -100 mask: the correct convention"))

    # (b) optax-style losses: kl_divergence(log_predictions, targets) and softmax_cross_entropy(one-hot).
    def _kl_divergence(log_predictions, targets):
        log_targets = jnp.where(targets == 0, 0.0, jnp.log(targets))
        return jnp.sum(targets * (log_targets - log_predictions), axis=-1)

    def _softmax_cross_entropy(logits, label_probs):
        return -jnp.sum(label_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)

    def optax_style_kd(student_logits, teacher_logits, labels, T=2.0, alpha=0.5):
        soft = _kl_divergence(jax.nn.log_softmax(student_logits / T), jax.nn.softmax(teacher_logits / T)).mean()
        hard = _softmax_cross_entropy(student_logits, jax.nn.one_hot(labels, student_logits.shape[-1])).mean()
        return alpha * soft + (1 - alpha) * hard

    _JAX.append(_entry(
        "optax_style_no_t2", "jax", optax_style_kd, _hinton(temperature=2.0, alpha=0.5, t_squared=False),
        "optax-style kl_divergence(log p, q).mean() (per-row KL, mean over rows = batchmean) without T^2, "
        "plus softmax_cross_entropy on one_hot labels (a -100 label is an all-zero row still in the mean)"))

    # (c) reverse KL (MiniLLM-style), T = 1, labels as a token mask.
    def reverse_kl_jax(student_logits, teacher_logits, labels):
        log_p = jax.nn.log_softmax(student_logits, axis=-1)
        log_q = jax.nn.log_softmax(teacher_logits, axis=-1)
        rkl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        mask = (labels != IGNORE).astype(rkl.dtype)
        return jnp.sum(rkl * mask) / jnp.sum(mask)

    _JAX.append(_entry(
        "reverse_kl_jax", "jax", reverse_kl_jax,
        {"divergence": "reverse_kl", "temperature": 1.0, "temperature_on": "none", "t_squared": None,
         "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True,
         "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": True},
        "reverse KL(p_student || q_teacher) at T = 1 over masked tokens (MiniLLM's divergence)"))

    # (d) a mean over every element (the JAX analogue of kl_div(reduction='mean')).
    def kd_jax_elementwise_mean(student_logits, teacher_logits, labels, T=2.0, alpha=0.5):
        log_p = jax.nn.log_softmax(student_logits / T, axis=-1)
        q = jax.nn.softmax(teacher_logits / T, axis=-1)
        soft = jnp.mean(q * (jnp.log(q) - log_p)) * T ** 2
        hard = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(student_logits, axis=-1), labels[:, None], axis=-1))
        return alpha * soft + (1 - alpha) * hard

    _JAX.append(_entry(
        "jax_elementwise_mean", "jax", kd_jax_elementwise_mean,
        _hinton(temperature=2.0, alpha=0.5, reduction="elementwise_mean"),
        "jnp.mean over the (N, C) KL terms: the soft term divided by N*C, T = 2, alpha = 0.5", exact=False))

    # (e) GKD-style JSD with the mixture in probability space, temperature without T^2.
    def gkd_jsd_jax(student_logits, teacher_logits, labels, beta=0.5, temperature=2.0):
        log_p = jax.nn.log_softmax(student_logits / temperature, axis=-1)
        log_q = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        log_m = jnp.log(beta * q + (1 - beta) * p)
        jsd = beta * jnp.sum(q * (log_q - log_m), axis=-1) + (1 - beta) * jnp.sum(p * (log_p - log_m), axis=-1)
        valid = labels != IGNORE
        return jnp.sum(jnp.where(valid, jsd, 0.0)) / jnp.sum(valid)

    _JAX.append(_entry(
        "gkd_jsd_jax", "jax", gkd_jsd_jax,
        {"divergence": "jsd", "beta": 0.5, "temperature": 2.0, "temperature_on": "both", "t_squared": False,
         "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True,
         "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": True},
        "GKD generalized JSD in JAX: m = beta q + (1-beta) p, beta KL(q||m) + (1-beta) KL(p||m), logits / T "
        "without T^2, masked tokens"))

# =====================================================================================================
# NumPy
# =====================================================================================================


def _np_log_softmax(x):
    shift = x - np.max(x, axis=-1, keepdims=True)
    return shift - np.log(np.sum(np.exp(shift), axis=-1, keepdims=True))


# (a) Hinton with its hand-derived gradient, -100 rows dropped, -inf classes masked.
def numpy_hinton_with_grad(student_logits, teacher_logits, labels, T=4.0, alpha=0.9, ignore_index=IGNORE):
    valid = labels != ignore_index
    n = max(int(valid.sum()), 1)
    log_p = _np_log_softmax(student_logits / T)
    log_q = _np_log_softmax(teacher_logits / T)
    p, q = np.exp(log_p), np.exp(log_q)
    with np.errstate(invalid="ignore"):   # -inf - -inf on padded classes, discarded by the where
        kl = np.where(q > 0, q * (log_q - log_p), 0.0).sum(axis=-1)
    log_p1 = _np_log_softmax(student_logits)
    y = np.where(valid, labels, 0)
    rows = np.arange(len(y))
    ce = -log_p1[rows, y]
    loss = np.sum(np.where(valid, alpha * T * T * kl + (1 - alpha) * ce, 0.0)) / n
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1.0
    # d(T^2 KL)/ds = T (p - q);  d CE/ds = softmax(s) - onehot(y)
    grad = alpha * T * (p - q) + (1 - alpha) * (np.exp(log_p1) - onehot)
    grad = np.where(valid[:, None], grad, 0.0) / n
    return loss, grad


_NUMPY.append(_entry(
    "numpy_hinton_loss_and_grad", None, numpy_hinton_with_grad, _hinton(ignore_index_honored=True, neg_inf_safe=True),
    "NumPy Hinton KD returning (loss, hand-derived grad alpha T (p - q) + (1-alpha)(softmax(s) - onehot)) / n",
    returns="loss_and_grad"))


# (b) Hinton, the loss alone, written the quick way.
def numpy_hinton(student_logits, teacher_logits, labels, T=2.0, alpha=0.5):
    q = np.exp(_np_log_softmax(teacher_logits / T))
    log_p = _np_log_softmax(student_logits / T)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.sum(q * (np.log(q) - log_p), axis=1).mean()
    ce = -_np_log_softmax(student_logits)[np.arange(len(labels)), labels].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


_NUMPY.append(_entry(
    "numpy_hinton", None, numpy_hinton,
    {k: v for k, v in _hinton(temperature=2.0, alpha=0.5).items() if k != "gradient_exact"},
    "NumPy Hinton KD, T = 2, alpha = 0.5, loss only (no gradient to check); a -100 label indexes "
    "another class (or raises) and q log q is NaN on -inf padding"))


# (c) NumPy with the T^2 factor forgotten.
def numpy_kd_no_t2(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
    log_q = _np_log_softmax(teacher_logits / T)
    log_p = _np_log_softmax(student_logits / T)
    kl_rows = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
    ce_rows = -np.take_along_axis(_np_log_softmax(student_logits), labels[:, None], axis=-1)[:, 0]
    return alpha * kl_rows.mean() + (1 - alpha) * ce_rows.mean()


_NUMPY.append(_entry(
    "numpy_missing_t2", None, numpy_kd_no_t2,
    {k: v for k, v in _hinton(t_squared=False).items() if k != "gradient_exact"},
    "NumPy Hinton KD without T^2 (alpha KL + (1-alpha) CE at T = 4), loss only"))


# -----------------------------------------------------------------------------------------------------
_ENTRIES = [*_TORCH, *_JAX, *_NUMPY]
GALLERY = _ENTRIES
_DECLARED = {  # every entry by backend, whether or not its framework imports here
    "torch": ["hinton_torch", "hinton_torch_masked", "kl_reduction_mean", "missing_t2", "kl_direction_swapped",
              "temperature_teacher_only", "temperature_student_only", "log_softmax_eps", "alpha_on_hard_term",
              "ignore_index_kl_all_rows", "masked_wrong_denominator", "onehot_ce_crashes_on_ignore",
              "trl_generalized_jsd", "jsd_mixture_swapped", "liger_tvd", "soft_cross_entropy",
              "label_smoothed_hard_term", "reduction_sum", "sequence_batchmean_unflattened", "student_detached",
              "kl_manual_log_nan", "kl_where_safe", "torchdistill_module", "repdistiller_distillkl",
              "mdistiller_weights", "reduction_none", "teacher_first_order", "fixed_keyword_arguments",
              "teacher_as_probs", "no_labels"],
    "jax": ["hinton_jax", "optax_style_no_t2", "reverse_kl_jax", "jax_elementwise_mean", "gkd_jsd_jax"],
    None: ["numpy_hinton_loss_and_grad", "numpy_hinton", "numpy_missing_t2"],
}
ALL_NAMES = [n for names in _DECLARED.values() for n in names]
_present = {e["name"] for e in GALLERY}
SKIPPED = [(n, needs) for needs, names in _DECLARED.items() for n in names if n not in _present]
assert _present <= set(ALL_NAMES) and len(ALL_NAMES) == len(set(ALL_NAMES))
