"""Held-out KD losses for ``minikd diagnose``: NOT in ``tests/diagnose_gallery.py``, written from the
public definitions the way widely used code bases write them (torchdistill / RepDistiller / NNI style
modules, HF transformers' distillation examples, the keras KD example, TRL's generalized JSD, Liger's
JSD / TVD semantics, optax, token-level LLM KD). Each entry's ``expect`` is the diagnosis it must get;
the entry format and field meanings are ``diagnose_gallery.py``'s ("Entry fields").

Verified (a scratch script, not committed): every entry's loss was compared in float64 on random
inputs with the minikd call its ``expect`` describes (``minikd.kd_loss_and_grad``; elementwise /
leading-axis means through ``normalizer=``, teacher-only temperature through a log-prob teacher),
value and student gradient to 1e-10 where ``exact``; ignore_index_honored by fn on a batch with rows
labeled -100 against fn on the batch without them (and, where the soft term keeps those rows, against
``unlabeled='soft'``); neg_inf_safe by padding both logits with -inf classes.
Only keys whose truth was checked are listed; ``why`` says what each loss is.
"""
from __future__ import annotations

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    torch = None

try:
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
except ImportError:
    jax = None

try:
    import optax
except ImportError:
    optax = None

__all__ = ["HELDOUT", "SKIPPED", "ALL_NAMES"]

from diagnose_gallery import HINTON, IGNORE, _entry, _hinton  # noqa: E402  (one entry format)


BASE = HINTON     # the textbook Hinton diagnosis; entries override keys (_e)
PURE = {"alpha": 1.0, "hard_term": "none"}


_e = _hinton


_TORCH, _JAX, _NUMPY = [], [], []

if torch is not None:

    # 1. an nn.Module at T = 1: nn.KLDivLoss(batchmean) between log_softmax(s) and softmax(t), alpha 0.5.
    class PlainKDModule(nn.Module):
        def __init__(self, alpha=0.5):
            super().__init__()
            self.alpha = alpha
            self.kl = nn.KLDivLoss(reduction="batchmean")
            self.ce = nn.CrossEntropyLoss()

        def forward(self, student_logits, teacher_logits, labels):
            soft = self.kl(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1))
            return self.alpha * soft + (1.0 - self.alpha) * self.ce(student_logits, labels)

    _TORCH.append(_entry(
        "kldivloss_module_T1", "torch", PlainKDModule,
        _e(temperature=1.0, temperature_on="none", t_squared=None, alpha=0.5),
        "nn.Module with nn.KLDivLoss(reduction='batchmean') at T = 1 plus nn.CrossEntropyLoss, alpha 0.5",
        module_init={"alpha": 0.5}))

    # 2. RepDistiller-style summed KL divided by logits.size(0), T = 10, pure.
    def distill_sum_over_batch_T10(y_s, y_t, T=10.0):
        kl = F.kl_div(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1), reduction="sum")
        return kl * T ** 2 / y_s.size(0)

    _TORCH.append(_entry(
        "sum_over_size0_T10", "torch", distill_sum_over_batch_T10,
        _e(temperature=10.0, ignore_index_honored=None, **PURE),
        "F.kl_div(reduction='sum') * T^2 / y_s.size(0) at T = 10 (= batchmean), no labels",
        order=("student", "teacher")))

    # 3. the student's probabilities clamped before the log: log(p.clamp(min=1e-9)).
    def kd_clamped_log(student_logits, teacher_logits, labels, T=2.0, alpha=0.5):
        p = F.softmax(student_logits / T, dim=-1)
        log_q = F.log_softmax(teacher_logits / T, dim=-1)
        q = log_q.exp()
        kl = (q * (log_q - torch.log(p.clamp(min=1e-9)))).sum(-1).mean()
        return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "clamped_student_log", "torch", kd_clamped_log,
        {"divergence": "forward_kl", "temperature": 2.0, "temperature_on": "both", "t_squared": True,
         "alpha": 0.5, "hard_term": "ce", "reduction": "batchmean", "ignore_index_honored": False,
         "neg_inf_safe": False, "eps_smoothing": False},
        "KL with torch.log(p.clamp(min=1e-9)) for the student: exact wherever p > 1e-9 (every core probe), "
        "a clamp (not log(p + eps)) on nearly one-hot rows; q * log q is NaN on -inf padding", exact=False))

    # 4. token-level KD on (B, S, C), flattened, KL mean over tokens whose label is not -100, T = 2.
    def token_kd_masked(student_logits, teacher_logits, labels, T=2.0):
        C = student_logits.size(-1)
        s = student_logits.reshape(-1, C) / T
        t = teacher_logits.reshape(-1, C) / T
        per_token = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)
        mask = labels.reshape(-1) != IGNORE
        return per_token[mask].mean() * T ** 2

    _TORCH.append(_entry(
        "token_kd_masked_mean", "torch", token_kd_masked,
        _e(temperature=2.0, ignore_index_honored=True, **PURE),
        "LLM token KD: (B, S, C) flattened, per-token KL at T = 2 averaged over labels != -100, times T^2",
        sequence=True))

    # 5. HF transformers' DistilBERT distiller: KLDivLoss(batchmean) * T^2 on every attended token,
    # MLM CE with ignore_index=-100, weights alpha_ce = 5.0, alpha_mlm = 2.0 (not summing to one).
    _kl_batchmean = nn.KLDivLoss(reduction="batchmean")
    _lm_ce = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def distilbert_loss(s_logits, t_logits, lm_labels, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0):
        loss_ce = _kl_batchmean(F.log_softmax(s_logits / temperature, dim=-1),
                                F.softmax(t_logits / temperature, dim=-1)) * temperature ** 2
        loss_mlm = _lm_ce(s_logits.view(-1, s_logits.size(-1)), lm_labels.view(-1))
        return alpha_ce * loss_ce + alpha_mlm * loss_mlm

    _TORCH.append(_entry(
        "distilbert_weights", "torch", distilbert_loss,
        _e(temperature=2.0, alpha=5.0, hard_weight=2.0),
        "HF DistilBERT distiller: alpha_ce * T^2 KL(batchmean, every token) + alpha_mlm * CE(ignore -100), "
        "5.0 and 2.0: soft on rows labeled -100 too"))

    # 6. teacher given as log-probabilities, KLDivLoss(log_target=True), T = 1, pure.
    _kl_logt = nn.KLDivLoss(reduction="batchmean", log_target=True)

    def kd_log_target(student_logits, teacher_log_probs):
        return _kl_logt(F.log_softmax(student_logits, dim=-1), teacher_log_probs)

    _TORCH.append(_entry(
        "log_target_teacher_logprobs", "torch", kd_log_target,
        _e(temperature=1.0, temperature_on="none", t_squared=None, ignore_index_honored=None, **PURE),
        "cached teacher log-probs into nn.KLDivLoss(batchmean, log_target=True): KL(q||p) at T = 1",
        order=("student", "teacher"), teacher_as="log_probs"))

    # 7. reverse KL at T = 2 with T^2, mean over labeled tokens (labels only mask).
    def reverse_kl_T2(student_logits, teacher_logits, labels, T=2.0):
        log_p = F.log_softmax(student_logits / T, dim=-1)
        log_q = F.log_softmax(teacher_logits / T, dim=-1)
        rkl = (log_p.exp() * (log_p - log_q)).sum(-1)
        mask = labels != IGNORE
        return rkl[mask].sum() / mask.sum() * T * T

    _TORCH.append(_entry(
        "reverse_kl_T2", "torch", reverse_kl_T2,
        _e(divergence="reverse_kl", temperature=2.0, ignore_index_honored=True, **PURE),
        "reverse KL(p||q) at T = 2 times T^2, mean over tokens with a label"))

    # 8. TRL-style generalized JSD (endpoint rule) used at beta 0.1, 0.9 / T 2, 0 and 1.
    def trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
        s = student_logits / temperature
        t = teacher_logits / temperature
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        if beta == 0:
            jsd = F.kl_div(log_s, log_t, reduction="none", log_target=True)
        elif beta == 1:
            jsd = F.kl_div(log_t, log_s, reduction="none", log_target=True)
        else:
            beta_t = torch.tensor(beta, dtype=log_s.dtype)
            mix = torch.logsumexp(torch.stack([log_s + torch.log(1 - beta_t), log_t + torch.log(beta_t)]), dim=0)
            kl_t = F.kl_div(mix, log_t, reduction="none", log_target=True)
            kl_s = F.kl_div(mix, log_s, reduction="none", log_target=True)
            jsd = beta_t * kl_t + (1 - beta_t) * kl_s
        if labels is not None:
            mask = labels != IGNORE
            jsd = jsd[mask]
        return jsd.sum() / (mask.sum() if labels is not None else jsd.size(0))

    _JSD = {"divergence": "jsd", "temperature": 1.0, "temperature_on": "none", "t_squared": None, "alpha": 1.0,
            "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True, "neg_inf_safe": False,
            "eps_smoothing": False, "gradient_exact": True}
    _TORCH.append(_entry(
        "trl_jsd_beta_0.1", "torch", trl_jsd, dict(_JSD, beta=0.1),
        "TRL generalized_jsd_loss at beta = 0.1 (the teacher's weight in m), T = 1, tokens masked by -100",
        fixed={"beta": 0.1}, sequence=True))
    _TORCH.append(_entry(
        "trl_jsd_beta_0.9_T2", "torch", trl_jsd, dict(_JSD, beta=0.9, temperature=2.0, temperature_on="both",
                                                     t_squared=False),
        "TRL generalized_jsd_loss at beta = 0.9, temperature = 2 (logits / T, no T^2)",
        fixed={"beta": 0.9, "temperature": 2.0}))
    _TORCH.append(_entry(
        "trl_jsd_beta_0_endpoint", "torch", trl_jsd,
        dict(_JSD, divergence="forward_kl", beta=None),
        "TRL generalized_jsd_loss at beta = 0: its endpoint rule makes it the forward KL(q||p)",
        fixed={"beta": 0.0}))
    _TORCH.append(_entry(
        "trl_jsd_beta_1_endpoint", "torch", trl_jsd,
        dict(_JSD, divergence="reverse_kl", beta=None),
        "TRL generalized_jsd_loss at beta = 1: its endpoint rule makes it the reverse KL(p||q)",
        fixed={"beta": 1.0}))

    # 9. TVD at T = 2 (Liger's 0.5 sum |p - q| on softened distributions), summed over the batch, pure.
    def tvd_T2_sum(student_logits, teacher_logits, T=2.0):
        p = torch.softmax(student_logits / T, dim=-1)
        q = torch.softmax(teacher_logits / T, dim=-1)
        return 0.5 * (p - q).abs().sum()

    _TORCH.append(_entry(
        "tvd_T2_sum", "torch", tvd_T2_sum,
        {"divergence": "tvd", "temperature": 2.0, "temperature_on": "both", "t_squared": False, "alpha": 1.0,
         "hard_term": "none", "reduction": "sum", "neg_inf_safe": True, "eps_smoothing": False,
         "gradient_exact": True},
        "total variation 0.5 |softmax(s/2) - softmax(t/2)|_1 summed over rows, no labels",
        order=("student", "teacher")))

    # 10. soft CE at T = 5 with T^2, alpha 0.3, label-smoothed hard term (0.1).
    _ce_ls = nn.CrossEntropyLoss(label_smoothing=0.1)

    def soft_ce_T5_ls(student_logits, teacher_logits, labels, T=5.0, alpha=0.3):
        q = F.softmax(teacher_logits / T, dim=-1)
        soft = torch.sum(-q * F.log_softmax(student_logits / T, dim=-1), dim=-1).mean()
        return alpha * soft * T ** 2 + (1 - alpha) * _ce_ls(student_logits, labels)

    _TORCH.append(_entry(
        "soft_ce_T5_label_smoothing", "torch", soft_ce_T5_ls,
        _e(divergence="soft_ce", temperature=5.0, alpha=0.3, hard_term="label_smoothed_ce", label_smoothing=0.1),
        "soft cross-entropy at T = 5 times T^2, alpha 0.3, hard term CrossEntropyLoss(label_smoothing=0.1)"))

    # 11. per-row soft CE at T = 3, no labels.
    def per_row_soft_ce_T3(student_logits, teacher_logits, T=3.0):
        q = F.softmax(teacher_logits / T, dim=-1)
        return -(q * F.log_softmax(student_logits / T, dim=-1)).sum(-1) * T ** 2

    _TORCH.append(_entry(
        "per_row_soft_ce_T3", "torch", per_row_soft_ce_T3,
        {"divergence": "soft_ce", "temperature": 3.0, "temperature_on": "both", "t_squared": True, "alpha": 1.0,
         "hard_term": "none", "reduction": "none", "neg_inf_safe": False, "eps_smoothing": False,
         "gradient_exact": True},
        "per-row soft cross-entropy at T = 3 times T^2 (reduction='none' left to the caller)",
        order=("student", "teacher")))

    # 12. (B, S, C) logits, summed KL divided by student.size(0): B, not the B*S tokens.
    def seq_sum_over_size0(student_logits, teacher_logits, T=2.0):
        kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="sum")
        return kl / student_logits.size(0) * T ** 2

    _TORCH.append(_entry(
        "sequence_sum_over_size0", "torch", seq_sum_over_size0,
        {"divergence": "forward_kl", "temperature": 2.0, "temperature_on": "both", "t_squared": True,
         "alpha": 1.0, "hard_term": "none", "reduction": "batch_axis_mean", "neg_inf_safe": False,
         "eps_smoothing": False, "gradient_exact": True},
        "kl_div(reduction='sum') / student.size(0) on unflattened (B, S, C) logits: divides by B",
        order=("student", "teacher"), sequence=True, exact=False))

    # 13. float32 arithmetic inside a float64 call (.float() casts), Hinton T = 4, alpha 0.9.
    def kd_float32_inside(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        s, t = student_logits.float(), teacher_logits.float()
        kd = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
        return (alpha * kd + (1 - alpha) * F.cross_entropy(s, labels)).to(student_logits.dtype)

    _TORCH.append(_entry(
        "float32_inside", "torch", kd_float32_inside,
        {"divergence": "forward_kl", "temperature": 4.0, "temperature_on": "both", "t_squared": True,
         "alpha": 0.9, "hard_weight": None, "hard_term": "ce", "reduction": "batchmean",
         "ignore_index_honored": False, "neg_inf_safe": False, "eps_smoothing": False},
        "Hinton KD computed in float32 (.float() casts) inside a float64 call: right convention, ~1e-7 "
        "rounding (no eps anywhere)", exact=False))

    # 14. teacher given as probabilities, softened by q ** (1 / T) renormalised (= softmax(t / T)).
    def kd_probs_power(student_logits, teacher_probs, labels, T=2.0, alpha=0.5):
        q = teacher_probs ** (1.0 / T)
        q = q / q.sum(-1, keepdim=True)
        kd = F.kl_div(F.log_softmax(student_logits / T, -1), q, reduction="batchmean")
        return alpha * T * T * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "teacher_probs_sharpened", "torch", kd_probs_power, _e(temperature=2.0, alpha=0.5),
        "cached teacher probabilities softened as q^(1/T) / sum q^(1/T) (= softmax(t / T)), T = 2, T^2, "
        "alpha 0.5", teacher_as="probs"))

    # 15. summed KL / logits.size(0) without T^2 at T = 3, alpha 0.25.
    def kd_T3_no_t2(logits, teacher_logits, labels, T=3.0, alpha=0.25):
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="sum") / logits.size(0)
        return alpha * kd + (1 - alpha) * F.cross_entropy(logits, labels)

    _TORCH.append(_entry(
        "no_t2_T3_alpha_0.25", "torch", kd_T3_no_t2, _e(temperature=3.0, alpha=0.25, t_squared=False),
        "F.kl_div(sum) / logits.size(0) at T = 3 without T^2, alpha 0.25"))

    # 16. T = 20 with T^2, alpha 0.95.
    def kd_T20(student_logits, teacher_logits, labels, T=20.0, alpha=0.95):
        kd = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
        return alpha * kd * T ** 2 + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "hinton_T20", "torch", kd_T20, _e(temperature=20.0, alpha=0.95),
        "Hinton KD at T = 20 (T^2 = 400), alpha 0.95"))

    # 17. T = 7 (not a 'nice' grid value), alpha 0.8.
    def kd_T7(student_logits, teacher_logits, labels, T=7.0, alpha=0.8):
        kd = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
        return alpha * kd * T ** 2 + (1 - alpha) * F.cross_entropy(student_logits, labels)

    _TORCH.append(_entry(
        "hinton_T7", "torch", kd_T7, _e(temperature=7.0, alpha=0.8),
        "Hinton KD at T = 7, alpha 0.8"))

    # 18. NNI / pytorch-classification style module, forward(output, target, teacher_output).
    class KDWithTargetSecond(nn.Module):
        def __init__(self, T=5.0, alpha=0.5):
            super().__init__()
            self.T, self.alpha = T, alpha

        def forward(self, output, target, teacher_output):
            T = self.T
            kd = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(output / T, dim=1), F.softmax(teacher_output / T, dim=1))
            return kd * (self.alpha * T * T) + F.cross_entropy(output, target) * (1.0 - self.alpha)

    _TORCH.append(_entry(
        "module_student_labels_teacher", "torch", KDWithTargetSecond, _e(temperature=5.0, alpha=0.5),
        "Module forward(output, target, teacher_output): Hinton at T = 5, alpha 0.5",
        order=("student", "labels", "teacher"), module_init={"T": 5.0, "alpha": 0.5}))

    # 19. per-token KL on (B, S, C) returned unreduced, zeroed where label is -100.
    def per_token_kl_masked(student_logits, teacher_logits, labels):
        kl = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), reduction="none",
                      log_target=True).sum(-1)
        return kl * (labels != IGNORE).to(kl.dtype)

    _TORCH.append(_entry(
        "per_token_kl_masked_unreduced", "torch", per_token_kl_masked,
        {"divergence": "forward_kl", "temperature": 1.0, "temperature_on": "none", "t_squared": None,
         "alpha": 1.0, "hard_term": "none", "reduction": "none", "ignore_index_honored": True,
         "neg_inf_safe": False, "eps_smoothing": False, "gradient_exact": True},
        "per-token KL (log_target=True) on (B, S, C), returned (B, S) with -100 tokens zeroed",
        sequence=True))

    # 20. Liger-style TVD on probabilities (teacher cached as probs), batchmean over labeled rows.
    def tvd_probs_masked(student_logits, teacher_probs, labels):
        p = student_logits.softmax(-1)
        tv = 0.5 * torch.abs(p - teacher_probs).sum(-1)
        keep = labels != IGNORE
        return (tv * keep).sum() / keep.sum()

    _TORCH.append(_entry(
        "tvd_teacher_probs_masked", "torch", tvd_probs_masked,
        {"divergence": "tvd", "temperature": 1.0, "temperature_on": "none", "t_squared": None, "alpha": 1.0,
         "hard_term": "none", "reduction": "batchmean", "ignore_index_honored": True, "neg_inf_safe": True,
         "eps_smoothing": False, "gradient_exact": True},
        "Liger LigerTVDLoss semantics on a probability teacher: 0.5 |p - q|_1, mean over labels != -100",
        teacher_as="probs"))

    # 21. label smoothing 0.2, masked both terms, sum / labeled count, T = 3, alpha 0.5.
    def kd_ls_masked(student_logits, teacher_logits, labels, T=3.0, alpha=0.5):
        keep = labels != IGNORE
        n = keep.sum()
        kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1),
                      reduction="none").sum(-1)
        ce = F.cross_entropy(student_logits, labels, ignore_index=IGNORE, label_smoothing=0.2, reduction="sum")
        return (alpha * T * T * (kl * keep).sum() + (1 - alpha) * ce) / n

    _TORCH.append(_entry(
        "label_smoothing_0.2_masked", "torch", kd_ls_masked,
        _e(temperature=3.0, alpha=0.5, hard_term="label_smoothed_ce", label_smoothing=0.2,
           ignore_index_honored=True),
        "masked Hinton T = 3, alpha 0.5, CE(label_smoothing=0.2, ignore_index=-100, sum) / labeled count"))

    # 22. the hard CE computed on the softened logits (a bug): CE(s / T, y).
    def kd_ce_at_T(student_logits, teacher_logits, labels, T=4.0, alpha=0.9):
        log_p = F.log_softmax(student_logits / T, -1)
        kd = F.kl_div(log_p, F.softmax(teacher_logits / T, -1), reduction="batchmean")
        return alpha * T * T * kd + (1 - alpha) * F.nll_loss(log_p, labels)

    _TORCH.append(_entry(
        "hard_ce_at_temperature", "torch", kd_ce_at_T,
        {"divergence": "unknown"},
        "the CE term reuses log_softmax(s / T) (CE at T = 4): no minikd convention computes it",
        exact=False))

    # 23. pure KD at T = 7 without T^2 (the scale_t2=False convention at a T off the round grid).
    def kd_pure_T7_no_t2(student_logits, teacher_logits, T=7.0):
        return F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1),
                        reduction="batchmean")

    _TORCH.append(_entry(
        "pure_no_t2_T7", "torch", kd_pure_T7_no_t2,
        {"divergence": "forward_kl", "temperature": 7.0, "temperature_on": "both", "t_squared": False,
         "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "neg_inf_safe": False,
         "eps_smoothing": False, "gradient_exact": True},
        "KL(softmax(t/7) || softmax(s/7)) batchmean, no T^2, no labels: minikd T=7, alpha=1, scale_t2=False",
        order=("student", "teacher")))

    # 24. label smoothing written as (1 - eps) on the label and eps / (C - 1) elsewhere (not PyTorch's
    # eps / C): minikd's label_smoothing eps * C / (C - 1), which depends on C -- no single minikd call.
    def kd_ls_eps_over_c_minus_1(student_logits, teacher_logits, labels, T=4.0, alpha=0.9, eps=0.1):
        C = student_logits.size(-1)
        target = torch.full_like(student_logits, eps / (C - 1))
        target.scatter_(1, labels[:, None], 1.0 - eps)
        ce = -(target * F.log_softmax(student_logits, -1)).sum(-1).mean()
        kd = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
        return alpha * T * T * kd + (1 - alpha) * ce

    _TORCH.append(_entry(
        "label_smoothing_eps_over_c_minus_1", "torch", kd_ls_eps_over_c_minus_1,
        {"divergence": "forward_kl", "temperature": 4.0, "temperature_on": "both", "t_squared": True,
         "reduction": "batchmean", "eps_smoothing": False, "gradient_exact": True},
        "Hinton T = 4, alpha 0.9 with a hand-made smoothed target eps / (C - 1) off the label: the value "
        "is minikd's at label_smoothing = eps C / (C - 1), C-dependent (no exact call); autograd is the "
        "exact gradient of the loss's own value (finite differences agree)", exact=False))

if jax is not None:

    # 25. keras KD example semantics in JAX: KLDivergence clips both to [1e-7, 1]; alpha = 0.1 on the
    # student (hard) loss, T = 10, T^2.
    def _keras_kld(y_true, y_pred):
        y_true = jnp.clip(y_true, 1e-7, 1.0)
        y_pred = jnp.clip(y_pred, 1e-7, 1.0)
        return jnp.mean(jnp.sum(y_true * jnp.log(y_true / y_pred), axis=-1))

    def keras_kd(student_logits, teacher_logits, labels, temperature=10.0, alpha=0.1):
        logp = jax.nn.log_softmax(student_logits, axis=-1)
        student_loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0])
        dist = _keras_kld(jax.nn.softmax(teacher_logits / temperature, axis=-1),
                          jax.nn.softmax(student_logits / temperature, axis=-1)) * temperature ** 2
        return alpha * student_loss + (1 - alpha) * dist

    _JAX.append(_entry(
        "keras_example_T10", "jax", keras_kd,
        {"divergence": "forward_kl", "temperature": 10.0, "temperature_on": "both", "t_squared": True,
         "alpha": 0.9, "hard_term": "ce", "reduction": "batchmean", "ignore_index_honored": False,
         "neg_inf_safe": True, "eps_smoothing": False},
        "keras.io KD example: alpha * SCCE + (1 - alpha) * KLDivergence(softmax(t/T), softmax(s/T)) * T^2, "
        "alpha 0.1, T = 10; keras clips both to [1e-7, 1] (exact unless a probability < 1e-7)", exact=False))

    # 26. symmetric JSD with m = (p + q) / 2 in JAX, mean over rows, no labels.
    def js_divergence_jax(student_logits, teacher_logits):
        log_p = jax.nn.log_softmax(student_logits, -1)
        log_q = jax.nn.log_softmax(teacher_logits, -1)
        log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
        kl_pm = jnp.sum(jnp.exp(log_p) * (log_p - log_m), -1)
        kl_qm = jnp.sum(jnp.exp(log_q) * (log_q - log_m), -1)
        return jnp.mean(0.5 * kl_pm + 0.5 * kl_qm)

    _JAX.append(_entry(
        "jax_symmetric_js", "jax", js_divergence_jax,
        {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "temperature_on": "none", "t_squared": None,
         "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "neg_inf_safe": False,
         "eps_smoothing": False, "gradient_exact": True},
        "Jensen-Shannon 0.5 KL(p||m) + 0.5 KL(q||m), m = (p + q) / 2 via logaddexp, mean over rows",
        order=("student", "teacher")))

    if optax is not None:
        # 27. optax: kl_divergence(log_softmax(s/T), softmax(t/T)).mean() * T^2 + integer-label CE.
        def optax_kd(student_logits, teacher_logits, labels, T=3.0, alpha=0.75):
            soft = optax.losses.kl_divergence(jax.nn.log_softmax(student_logits / T),
                                              jax.nn.softmax(teacher_logits / T)).mean() * T ** 2
            hard = optax.losses.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
            return alpha * soft + (1 - alpha) * hard

        _JAX.append(_entry(
            "optax_kl_T3", "jax", optax_kd, _e(temperature=3.0, alpha=0.75),
            "optax.losses.kl_divergence(...).mean() * T^2 at T = 3, alpha 0.75, "
            "softmax_cross_entropy_with_integer_labels"))

        # 28. optax soft CE (softmax_cross_entropy with soft targets) at T = 2 without T^2, pure.
        def optax_soft_ce(student_logits, teacher_logits, T=2.0):
            return optax.losses.softmax_cross_entropy(student_logits / T, jax.nn.softmax(teacher_logits / T)).mean()

        _JAX.append(_entry(
            "optax_soft_ce_T2", "jax", optax_soft_ce,
            {"divergence": "soft_ce", "temperature": 2.0, "temperature_on": "both", "t_squared": False,
             "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "neg_inf_safe": False,
             "eps_smoothing": False, "gradient_exact": True},
            "optax.losses.softmax_cross_entropy(s / T, softmax(t / T)).mean(), T = 2, no T^2",
            order=("student", "teacher")))


# 29. NumPy reverse KL at T = 2 with its hand-derived gradient, batchmean.
def _np_log_softmax(x):
    z = x - np.max(x, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def numpy_reverse_kl_with_grad(student_logits, teacher_logits, T=2.0):
    log_p = _np_log_softmax(student_logits / T)
    log_q = _np_log_softmax(teacher_logits / T)
    p = np.exp(log_p)
    d = log_p - log_q
    rows = np.sum(p * d, axis=-1)
    n = rows.shape[0]
    # d KL(p||q)/ds = p * (d - sum p d) / T
    grad = p * (d - rows[:, None]) / T / n
    return rows.mean(), grad


_NUMPY.append(_entry(
    "numpy_reverse_kl_grad", None, numpy_reverse_kl_with_grad,
    {"divergence": "reverse_kl", "temperature": 2.0, "temperature_on": "both", "t_squared": False,
     "alpha": 1.0, "hard_term": "none", "reduction": "batchmean", "neg_inf_safe": False,
     "eps_smoothing": False, "gradient_exact": True},
    "NumPy reverse KL(p||q) at T = 2 (no T^2), batchmean, returning (loss, p (d - sum p d) / (T N))",
    order=("student", "teacher"), returns="loss_and_grad"))


HELDOUT = [*_TORCH, *_JAX, *_NUMPY]
_DECLARED = {
    "torch": ["kldivloss_module_T1", "sum_over_size0_T10", "clamped_student_log", "token_kd_masked_mean",
              "distilbert_weights", "log_target_teacher_logprobs", "reverse_kl_T2", "trl_jsd_beta_0.1",
              "trl_jsd_beta_0.9_T2", "trl_jsd_beta_0_endpoint", "trl_jsd_beta_1_endpoint", "tvd_T2_sum",
              "soft_ce_T5_label_smoothing", "per_row_soft_ce_T3", "sequence_sum_over_size0", "float32_inside",
              "teacher_probs_sharpened", "no_t2_T3_alpha_0.25", "hinton_T20", "hinton_T7",
              "module_student_labels_teacher", "per_token_kl_masked_unreduced", "tvd_teacher_probs_masked",
              "label_smoothing_0.2_masked", "hard_ce_at_temperature", "pure_no_t2_T7",
              "label_smoothing_eps_over_c_minus_1"],
    "jax": ["keras_example_T10", "jax_symmetric_js", "optax_kl_T3", "optax_soft_ce_T2"],
    None: ["numpy_reverse_kl_grad"],
}
ALL_NAMES = [n for names in _DECLARED.values() for n in names]
_present = {e["name"] for e in HELDOUT}
SKIPPED = [(n, needs) for needs, names in _DECLARED.items() for n in names if n not in _present]
assert _present <= set(ALL_NAMES) and len(ALL_NAMES) == len(set(ALL_NAMES))
