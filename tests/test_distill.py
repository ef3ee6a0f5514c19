"""On-policy distillation (algorithm: distill): the per-token divergences against TRL's GKD and the textbook
formulas; the tiled path through both models' forwards (grouped and naive) against full logits, values and
gradients at 1e-5; the load checks (tokenizer, prompt ids, head rows), each one line; and a short run on the
tiny models whose reverse KL to a larger teacher falls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import ConfigError, DataConfig, MediaConfig, load_recipe
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.forward import token_scores
from r1_mm.models.forward.grouped import pack_groups
from r1_mm.models.forward.scoring import score_divergence
from r1_mm.models.tiny import TinySpec, build_tokenizer, tiny_model_path
from r1_mm.rollout.base import media_token_ids
from r1_mm.trainers.distill_losses import (
    divergence_beta,
    generalized_jsd,
    reverse_kl,
    sampled_reverse_kl,
    token_divergence,
)

G = 2
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


# -- the pure losses ----------------------------------------------------------------------------------------
def logits_pair(seed: int = 0, shape=(3, 5, 37)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 3


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_is_trls_per_token(beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    s, t = logits_pair()
    trl = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
    ours = generalized_jsd(s, t, beta, temperature)
    torch.testing.assert_close(ours, trl, atol=1e-6, rtol=1e-5)
    assert ours.shape == s.shape[:-1] and bool((ours > 1e-3).all())  # a real divergence on every token
    # TRL's batchmean over the tokens is our token mean
    batch = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature)
    assert float(batch) == pytest.approx(float(ours.sum() / s.shape[0]), rel=1e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_divergences_are_the_textbook_formulas(beta):
    s, t = logits_pair(1)
    p, q = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    m = (1 - beta) * p + beta * q
    expected = kl(q, p) if beta == 0 else kl(p, q) if beta == 1 else beta * kl(q, m) + (1 - beta) * kl(p, m)
    torch.testing.assert_close(generalized_jsd(s, t, beta).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reverse_kl(s, t).double(), kl(p, q), atol=1e-5, rtol=1e-5)
    assert divergence_beta("reverse_kl", 0.3) == 1.0 and divergence_beta("jsd", beta) == beta
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl", 0.3), reverse_kl(s, t))
    with pytest.raises(ValueError, match="unknown distillation loss"):
        divergence_beta("forward_kl", 0.5)


def test_sampled_reverse_kl_by_hand():
    """A served teacher's loss on two tokens: estimate = log p_s - log p_t, loss = estimate * log p_s, and the
    gradient with respect to log p_s is the estimate (the advantage is detached)."""
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([-1.5, -1.0])
    loss, estimate = sampled_reverse_kl(student, teacher)
    torch.testing.assert_close(estimate, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(loss.detach(), torch.tensor([-0.5, 2.0]))
    assert not estimate.requires_grad
    (grad,) = torch.autograd.grad(loss.sum(), student)
    torch.testing.assert_close(grad, torch.tensor([0.5, -1.0]))


def test_sampled_reverse_kl_expects_the_full_reverse_kl_and_its_gradient():
    """Over y ~ p_s, enumerated exactly for 4 positions of a 7-token vocabulary: the estimate's mean is KL(p_s || p_t)
    and the loss's mean gradient (with respect to the student's logits) is the full reverse KL's gradient."""
    gen = torch.Generator().manual_seed(0)
    student_logits = (torch.randn(4, 7, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    teacher_logits = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 2
    s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    loss, estimate = sampled_reverse_kl(s, t)  # every token y at every position, as if it had been sampled
    p = s.detach().exp()
    expected_loss = (p * loss).sum()
    per_position = (s.exp() * (s - t)).sum(-1)  # KL(p_s || p_t) in float64 (reverse_kl computes in float32)
    torch.testing.assert_close(per_position.float(), reverse_kl(student_logits, teacher_logits), atol=1e-6, rtol=1e-6)
    full = per_position.sum()
    torch.testing.assert_close((p * estimate).sum(-1), per_position.detach(), atol=1e-12, rtol=0)
    (got,) = torch.autograd.grad(expected_loss, student_logits, retain_graph=True)
    (want,) = torch.autograd.grad(full, student_logits, retain_graph=True)
    assert float(want.abs().max()) > 0.05  # a real gradient to match
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # and by sampling: 200,000 draws per position agree to Monte Carlo precision
    draws = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    sampled_loss, _ = sampled_reverse_kl(s.gather(1, draws), t.gather(1, draws))
    (mc,) = torch.autograd.grad(sampled_loss.mean(1).sum(), student_logits)
    assert float((mc - want).abs().max()) < 0.02 * float(want.abs().max()) + 5e-3


# -- the tiled path through both models -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_cache):
    """The tiny student and a larger teacher of another seed with the same tokenizer, its head padded past the
    student's (as Qwen2.5-VL-7B's 152,064 rows against 3B's 151,936)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    student_path = tiny_model_path(TinySpec(), cache_dir=tiny_cache)
    teacher_path = tiny_model_path(TinySpec(seed=1, hidden_size=96, num_layers=3, model_vocab_size=1088),
                                   cache_dir=tiny_cache)
    student = AutoModelForImageTextToText.from_pretrained(student_path).train()
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_path).eval()
    assert teacher.get_output_embeddings().weight.shape[0] > student.get_output_embeddings().weight.shape[0]
    return student, teacher, AutoProcessor.from_pretrained(student_path)


def samples_and_completions(processor, synthetic_data):
    data = synthetic_data["counting"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(min_pixels=3136, max_pixels=3136), default_media_root(data))
    samples = [builder.prepare(row, i) for i, row in enumerate(read_rows(data)[:2])]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (9, 4, 12, 1)]
    return samples, completions


def reference(student, teacher, samples, completions, pad, beta, temperature, suppressed):
    """Full logits of both models at the scored positions (each model's own forward), the suppressed media tokens
    biased as the tiled heads bias them, the teacher's rows past the student's vocabulary dropped."""
    rows = []
    for model in (student, teacher):
        packed = pack_groups(model, [dict(s.inputs) for s in samples], completions, G, pad)
        token_scores.install(model)
        logits = model._r1mm_original_forward(**packed.model_kwargs(model), logits_to_keep=packed.logits_index,
                                              use_cache=False).logits[0]
        rows.append(logits)
    vocab = rows[0].shape[-1]
    s, t = rows[0], rows[1][:, :vocab]
    bias = torch.zeros(vocab)
    bias[suppressed] = token_scores.SUPPRESS_LOGIT
    return packed.to_completion_grid(generalized_jsd(s + bias, t + bias, beta, temperature)), packed.completion_mask


@pytest.mark.parametrize(("loss", "beta", "temperature"), [("reverse_kl", 0.5, 1.0), ("jsd", 0.3, 0.8)])
def test_tiled_divergence_is_the_full_logits_one(pair, synthetic_data, monkeypatch, loss, beta, temperature):
    """Values and the student's gradients, grouped and naive, at 1e-5; many vocabulary tiles and token chunks."""
    import trl.kernels.chunked_divergence as kernel

    monkeypatch.setattr(kernel, "VOCAB_CHUNK_SIZE", 100)
    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 8)
    student, teacher, processor = pair
    samples, completions = samples_and_completions(processor, synthetic_data)
    pad = processor.tokenizer.pad_token_id
    suppressed = media_token_ids(student.config)
    assert suppressed
    b = divergence_beta(loss, beta)
    params = [p for p in student.parameters() if p.requires_grad]

    def grads(total):
        return torch.autograd.grad(total, params, allow_unused=True)

    expected, mask = reference(student, teacher, samples, completions, pad, b, temperature, suppressed)
    expected_grads = grads((expected * mask).sum())
    assert float((expected * mask).sum().detach()) > 0.1
    for mode in ("grouped", "naive"):
        got, entropy, got_mask = score_divergence(student, teacher, samples, completions, G, pad, beta=b,
                                                  temperature=temperature, mode=mode, suppressed_ids=suppressed)
        assert torch.equal(got_mask, mask)
        torch.testing.assert_close(got * mask, expected * mask, atol=1e-5, rtol=1e-5)
        assert bool((entropy[mask.bool()] > 0).all())
        for g_got, g_exp in zip(grads((got * mask).sum()), expected_grads, strict=True):
            if g_exp is None:
                continue
            torch.testing.assert_close(g_got, g_exp, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher takes no gradient


# -- load checks -------------------------------------------------------------------------------------------
def test_tiny_tokenizer_is_the_same_across_seeds_and_sizes():
    from r1_mm.trainers.distill import tokenizer_mismatch

    small = build_tokenizer(TinySpec(small_vocab=True))
    bigger = build_tokenizer(TinySpec(small_vocab=True, seed=3, hidden_size=96, num_layers=3))
    assert tokenizer_mismatch(small, bigger) is None
    why = tokenizer_mismatch(small, build_tokenizer(TinySpec()))
    assert why and "tokens" in why


def test_prompt_mismatch_names_the_input():
    from types import SimpleNamespace

    from r1_mm.trainers.distill import prompt_mismatch

    a = SimpleNamespace(inputs={"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.ones(4, 6)})
    same = SimpleNamespace(inputs={"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.ones(4, 6)})
    other = SimpleNamespace(inputs={"input_ids": torch.tensor([[1, 2, 4]]), "pixel_values": torch.ones(4, 6)})
    fewer = SimpleNamespace(inputs={"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.ones(2, 6)})
    assert prompt_mismatch(a, same) is None
    assert "input_ids" in prompt_mismatch(a, other)
    assert "pixel_values" in prompt_mismatch(a, fewer)


def recipe(tmp_path: Path, data: Path, teacher: str, *overrides: str):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136",
        "rollout.num_generations=4", "rollout.max_completion_length=8", "training.prompts_per_step=2",
        "training.learning_rate=1e-3", "logging.progress_bar=false", "logging.report_to=[]",
        "algorithm.name=distill", f"algorithm.distill.teacher={teacher}", *overrides])


def test_a_served_teacher_takes_reverse_kl_at_temperature_1_only():
    """A served teacher gives sampled-token logprobs at temperature 1: jsd, another distill temperature and greedy
    rollouts are refused at load, each in one line; teacher_servers without teacher_engine=vllm too."""
    base = ["algorithm.name=distill", "algorithm.distill.teacher_engine=vllm",
            "algorithm.distill.teacher_servers=[http://127.0.0.1:1]"]
    load_recipe(None, base)  # servers given: the teacher's name may stay empty
    for extra, message in [("algorithm.distill.loss=jsd", "needs the teacher's full distribution"),
                           ("algorithm.distill.temperature=0.5", "temperature must be 1 with a served teacher"),
                           ("rollout.temperature=0", "rollout.temperature must be > 0")]:
        with pytest.raises(ConfigError, match=message) as info:
            load_recipe(None, [*base, extra])
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="teacher_servers needs algorithm.distill.teacher_engine=vllm"):
        load_recipe(None, ["algorithm.name=distill", "algorithm.distill.teacher=x",
                           "algorithm.distill.teacher_servers=[http://127.0.0.1:1]"])
    with pytest.raises(ConfigError, match="algorithm.distill.teacher is empty"):
        load_recipe(None, ["algorithm.name=distill", "algorithm.distill.teacher_engine=vllm"])


def test_recipe_needs_a_teacher_and_a_beta_in_range():
    with pytest.raises(ConfigError, match="algorithm.distill.teacher is empty"):
        load_recipe(None, ["algorithm.name=distill"])
    with pytest.raises(ConfigError, match=r"algorithm.distill.beta must be in \[0, 1\]"):
        load_recipe(None, ["algorithm.name=distill", "algorithm.distill.teacher=x", "algorithm.distill.beta=1.5"])


def test_preflight_reads_the_teachers_config(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    """Before any weights: a teacher that cannot be read, or whose head is smaller than the student's vocabulary."""
    from r1_mm.run.preflight import preflight

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    data = synthetic_data["counting"]
    with pytest.raises(ConfigError, match=r"^algorithm.distill.teacher: .*/no-such-teacher"):
        preflight(recipe(tmp_path, data, str(tmp_path / "no-such-teacher")))
    smaller = recipe(tmp_path, data, "tiny:qwen2_5_vl:small", "model.name_or_path=tiny:qwen2_5_vl")
    with pytest.raises(ConfigError, match=r"its vocabulary has 128 rows, fewer than the student's 512"):
        preflight(smaller)
    preflight(recipe(tmp_path, data, "tiny:qwen2_5_vl:small"))  # the same tokenizer: nothing to say


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    from r1_mm.trainers.distill import DistillTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = recipe(tmp_path, synthetic_data["counting"], "tiny:qwen2_5_vl", "training.max_steps=1")
    with pytest.raises(ConfigError) as info:
        DistillTrainer(cfg)
    line = str(info.value)
    assert "\n" not in line and "its tokenizer is not the student's" in line


def test_a_teacher_whose_processor_writes_other_prompt_ids_is_refused(tmp_path, synthetic_data, tiny_cache,
                                                                       monkeypatch):
    """The same tokenizer but another chat template (as a base checkpoint against an instruct one): refused
    before the teacher's weights load, naming the input that differs."""
    import shutil

    from r1_mm.trainers.distill import DistillTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_path(TinySpec(small_vocab=True, seed=1), cache_dir=tiny_cache), teacher)
    template = teacher / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    assert "<|im_start|> " in template.read_text()
    cfg = recipe(tmp_path, synthetic_data["counting"], str(teacher), "training.max_steps=1")
    with pytest.raises(ConfigError) as info:
        DistillTrainer(cfg)
    line = str(info.value)
    assert "\n" not in line and "prepares the first row differently" in line and "input_ids" in line


# -- a short run -------------------------------------------------------------------------------------------
def test_student_reverse_kl_to_the_teacher_falls(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    """8 steps on the hf engine's samples (2 prompts x 4 completions of <= 6 tokens): the token-mean reverse KL
    falls by well over a third (measured with training seeds 0-2: 0.019-0.020 over the first 4 steps, 0.0055-0.006
    over the last 4). Premise: a distinct, larger teacher ran its forward every step, and the divergence computed
    was the reverse KL (beta = 1)."""
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers import distill as distill_module
    from r1_mm.trainers.distill import DistillTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    teacher_path = tiny_model_path(TinySpec(small_vocab=True, seed=1, hidden_size=96, num_layers=3),
                                   cache_dir=tiny_cache)
    steps = 8
    cfg = recipe(tmp_path, synthetic_data["counting"], str(teacher_path), f"training.max_steps={steps}",
                 "rollout.max_completion_length=6")
    trainer = DistillTrainer(cfg)
    assert trainer.teacher is not trainer.learner.unwrapped and trainer.beta == 1.0
    assert trainer.teacher.config.get_text_config().hidden_size == 96
    teacher_calls, betas = [], []
    token_scores.install(trainer.teacher)
    original = trainer.teacher.forward
    trainer.teacher.forward = lambda *a, **k: teacher_calls.append(k.get("r1mm_score")) or original(*a, **k)
    divergence = token_scores._divergence

    def spy(hidden, head, text, request):
        betas.append(request.divergence.beta)
        assert request.divergence.head is trainer.teacher.get_output_embeddings()
        return divergence(hidden, head, text, request)

    monkeypatch.setattr(token_scores, "_divergence", spy)
    synced, sampling = [], []
    sync, generate = trainer.engine.update_weights, distill_module.generate_groups

    def generate_groups(*args, **kwargs):
        sampling.append(True)
        try:
            return generate(*args, **kwargs)
        finally:
            sampling.pop()

    monkeypatch.setattr(distill_module, "generate_groups", generate_groups)
    trainer.engine.update_weights = lambda model: synced.append(not sampling and model) or sync(model)
    trainer.train()
    # every optimizer step's weights are sent to the engine (the hf engine also takes the live model when it
    # samples; a vLLM engine would otherwise sample from the first weights for ever)
    assert synced.count(trainer.learner.unwrapped) == steps
    assert len(teacher_calls) == steps and all(r is not None and r.hidden_only for r in teacher_calls)
    assert betas == [1.0] * steps
    metrics = read_metrics(cfg.training.output_dir)
    kl = [m["train/reverse_kl"] for m in metrics]
    assert len(kl) == steps and all(m["train/loss"] == m["train/reverse_kl"] for m in metrics)
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert first > 0.005 and last < 0.7 * first, kl
    assert distill_module.train_distill  # registered under algorithm.name=distill


def test_jsd_with_the_naive_forward_runs_the_configured_beta(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.distill import DistillTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    teacher_path = tiny_model_path(TinySpec(small_vocab=True, seed=1, hidden_size=96, num_layers=3),
                                   cache_dir=tiny_cache)
    cfg = recipe(tmp_path, synthetic_data["counting"], str(teacher_path), "training.max_steps=2",
                 "algorithm.distill.loss=jsd", "algorithm.distill.beta=0.3", "training.forward_mode=naive",
                 "rollout.num_generations=2", "rollout.max_completion_length=4")
    betas = []
    divergence = token_scores._divergence
    monkeypatch.setattr(token_scores, "_divergence",
                        lambda hidden, head, text, request: betas.append(request.divergence.beta)
                        or divergence(hidden, head, text, request))
    DistillTrainer(cfg).train()
    assert betas == [0.3, 0.3]
    metrics = read_metrics(cfg.training.output_dir)
    assert all(m["train/jsd"] == m["train/loss"] > 0 for m in metrics) and len(metrics) == 2
