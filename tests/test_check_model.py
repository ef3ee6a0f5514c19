"""`r1-mm check-model`: the sampler/learner contract table passes on the verified tiny families, and a
planted mismatch of each kind (a grouped forward off by 1e-3, one placeholder too many, a missed sync, a
weight name the engine's loader drops) makes it fail with exit 1."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from r1_mm.cli import main
from r1_mm.models.contract import ROW_KINDS, cheap_contract

CHECKS = ("placeholders", "grouped_vs_naive", "learner_vs_sampler")


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def table_rows(out: str) -> dict[tuple[str, str], str]:
    """(check, row kind) -> the table line."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in (*CHECKS, "weight_names"):
            rows[(parts[0], parts[1])] = line
    return rows


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout from the table's header on, stderr)."""
    code = main(["check-model", *argv])
    captured = capsys.readouterr()
    out = captured.out
    with capsys.disabled():
        print(out[out.find("check-model "):] if "check-model " in out else out, captured.err)
    return code, out[out.find("check-model "):] if "check-model " in out else out, captured.err


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "glm4v", "qwen3_5"])  # GLM: video features on image tokens
def test_passes_on_verified_tiny_families_with_hf(capsys, family):
    code, out, _ = run(capsys, f"tiny:{family}")
    print(out)
    assert code == 0, out
    rows = table_rows(out)
    assert "a verified family" in out.splitlines()[0]
    for check in CHECKS:
        for kind in ROW_KINDS:
            line = rows[(check, kind)]
            assert line.rstrip().endswith("ok"), line
            assert re.search(r"\d", line.split(kind, 1)[1]), line  # a measured number, not a bare verdict
    for kind in ROW_KINDS:  # the premise of the sync check: a missed sync would have shown
        unsynced = float(re.search(r"unsynced ([0-9.e+-]+)", rows[("learner_vs_sampler", kind)]).group(1))
        assert unsynced > 1e-4
    assert "not applicable" in rows[("weight_names", "all")] and "skip" in rows[("weight_names", "all")]
    assert "1e-05" in rows[("grouped_vs_naive", "image")] and "0.0001" in rows[("learner_vs_sampler", "image")]


def test_planted_grouped_error_is_caught(capsys, monkeypatch):
    import r1_mm.models.forward.scoring as scoring

    real = scoring.grouped_logprobs

    def off_by_1e3(*args, **kwargs):
        logps, *rest = real(*args, **kwargs)
        return (logps + 1e-3, *rest)

    monkeypatch.setattr(scoring, "grouped_logprobs", off_by_1e3)
    code, out, _ = run(capsys, "tiny:qwen2_5_vl")
    rows = table_rows(out)
    assert code == 1, out
    for kind in ROW_KINDS:
        line = rows[("grouped_vs_naive", kind)]
        assert "FAIL" in line and "1.00e-03" in line, line
        assert rows[("placeholders", kind)].rstrip().endswith("ok")
    assert "mismatch" in out.splitlines()[-1]


def test_one_placeholder_too_many_is_caught(capsys, monkeypatch):
    """A processor that emits one image placeholder more than the vision path has features for."""
    import r1_mm.data.prompts as prompts

    real = prompts.encode_prompts

    def one_more(processor, texts, images, videos, **kwargs):
        inputs = real(processor, texts, images, videos, **kwargs)
        if images:
            ids = inputs["input_ids"]
            image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            first = int((ids[0] == image_token).nonzero()[0])
            ids[0, first - 1] = image_token  # the token before the first placeholder becomes one more
        return inputs

    monkeypatch.setattr(prompts, "encode_prompts", one_more)
    code, out, _ = run(capsys, "tiny:qwen2_5_vl")
    rows = table_rows(out)
    assert code == 1, out
    assert "image 5 tokens / 4 features" in rows[("placeholders", "image")] and "FAIL" in rows[("placeholders", "image")]
    assert "image 9 tokens / 8 features" in rows[("placeholders", "two_images")]
    assert rows[("placeholders", "video")].rstrip().endswith("ok")  # no image in that row: untouched
    assert rows[("learner_vs_sampler", "video")].rstrip().endswith("ok")  # each row kind is sampled alone


def test_bad_model_is_one_line_exit_2(capsys, tmp_path):
    for bad in ("tiny:nope", str(tmp_path / "no-such-model")):
        code, out, err = run(capsys, bad)
        assert code == 2 and "check-model " not in out, (bad, out)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    with pytest.raises(SystemExit) as exit_:  # argparse's choices
        main(["check-model", "tiny:qwen2_5_vl", "--engine", "nope"])
    assert exit_.value.code == 2


@pytest.fixture(scope="module")
def tiny_qwen(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_path("qwen2_5_vl")
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def test_cheap_contract_is_callable_before_step_1(tiny_qwen):
    """What a training run can call on its loaded model and processor: (a) and (b), no engine; the model
    is left as it was (training mode, weights untouched)."""
    from r1_mm.models.families import get_family

    model, processor = tiny_qwen
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = cheap_contract(model, processor, family=get_family("qwen2_5_vl"))
    assert [(x.check, x.kind) for x in lines] == [(c, k) for c in ("placeholders", "grouped_vs_naive") for k in ROW_KINDS]
    assert all(x.passed for x in lines), lines
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cheap_contract_gives_one_line_to_refuse_with(tiny_qwen, monkeypatch):
    import r1_mm.models.forward.scoring as scoring
    from r1_mm.models.contract import contract_refusal

    model, processor = tiny_qwen
    assert contract_refusal(cheap_contract(model, processor)) is None
    real = scoring.grouped_logprobs
    monkeypatch.setattr(scoring, "grouped_logprobs", lambda *a, **k: (real(*a, **k)[0] + 1e-3, *real(*a, **k)[1:]))
    line = contract_refusal(cheap_contract(model, processor))
    assert line is not None and "\n" not in line and "(3 of 6 checks)" in line
    assert "grouped_vs_naive on image: 1.00e-03" in line and "tolerance <= 1e-05" in line


def test_refused_grouped_is_skipped_with_the_familys_line(tiny_qwen):
    from r1_mm.models.families import get_family

    model, processor = tiny_qwen
    family = get_family("qwen2_5_vl")
    refusing = dataclasses.replace(family, support={**family.support, "grouped": "no packed layout for its layers"})
    lines = [x for x in cheap_contract(model, processor, family=refusing) if x.check == "grouped_vs_naive"]
    assert len(lines) == len(ROW_KINDS) and all(x.passed is None and x.status == "skip" for x in lines)
    assert all("no packed layout for its layers" in x.note and "Qwen2.5-VL" in x.note for x in lines)


def test_a_family_that_refuses_video_gets_no_video_row(tiny_qwen):
    from r1_mm.models.families import get_family

    model, processor = tiny_qwen
    family = get_family("qwen2_5_vl")
    no_video = dataclasses.replace(family, support={**family.support, "video": "its processor takes no video"})
    lines = cheap_contract(model, processor, family=no_video)
    assert [(x.check, x.kind) for x in lines] == [(c, k) for c in ("placeholders", "grouped_vs_naive") for k in ROW_KINDS]
    video = [x for x in lines if x.kind == "video"]
    assert all(x.status == "skip" and "its processor takes no video" in x.note for x in video)
    assert all(x.passed for x in lines if x.kind != "video")


def test_unverified_family_is_still_checked(capsys, monkeypatch):
    """A model_type outside the registered families: the header says so and every check still runs
    (grouped included: not skipped, since nothing refused it)."""
    import r1_mm.models.families as families
    from r1_mm.models.families import UnsupportedModelError

    def unknown(config):
        raise UnsupportedModelError("not registered")

    monkeypatch.setattr(families, "family_of", unknown)
    code, out, _ = run(capsys, "tiny:qwen2_5_vl")
    assert "NOT a verified family" in out.splitlines()[0]
    rows = table_rows(out)
    assert all(rows[("grouped_vs_naive", k)].rstrip().endswith("ok") for k in ROW_KINDS)
    assert code == 0


def test_weight_names_the_loader_would_drop_or_not_place():
    from r1_mm.rollout.weight_names import resolve_names

    class Mapper:
        def map_name(self, name):
            if name.startswith("model.rotary"):
                return None
            return name.replace("model.language_model.", "language_model.model.", 1)

    targets = {"language_model.model.layers.0.self_attn.qkv_proj.weight", "language_model.model.norm.weight"}
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    names = ["model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.0.self_attn.v_proj.weight",
             "model.language_model.norm.weight", "model.rotary.inv_freq", "model.language_model.layers.0.mlp.experts.gate_up"]
    rejected = resolve_names(names, Mapper(), targets, packed)
    assert rejected == {"model.rotary.inv_freq": "dropped by the engine's name mapping",
                        "model.language_model.layers.0.mlp.experts.gate_up":
                            "no engine parameter 'language_model.model.layers.0.mlp.experts.gate_up'"}
    # an MoE layer places fused experts by its own mapping (vLLM's RoutedExperts.get_expert_mapping)
    layer = "language_model.model.layers.0.mlp.experts"
    experts = {layer: (f"{layer}.routed_experts", [("w13_", "gate_up_proj."), ("w2_", "down_proj.")])}
    targets |= {f"{layer}.routed_experts.w13_weight", f"{layer}.routed_experts.w2_weight"}
    names = [f"model.language_model.layers.0.mlp.experts.{n}" for n in ("gate_up_proj.weight", "down_proj.weight", "up_proj.weight")]
    rejected = resolve_names(names, Mapper(), targets, packed, experts)
    assert rejected == {names[2]: f"no engine parameter '{layer}.up_proj.weight'"}


@pytest.mark.slow
def test_vllm_colocate_passes_and_a_missed_sync_fails(capsys, monkeypatch):
    code, out, _ = run(capsys, "tiny:qwen2_5_vl", "--engine", "vllm_colocate")
    print(out)
    rows = table_rows(out)
    assert code == 0, out
    assert "engine vllm_colocate" in out.splitlines()[0]
    # the premise that vLLM ran: the loader's name check, which hf skips; float32: the engines' 1e-4 holds
    assert all("0.0001" in rows[("learner_vs_sampler", k)] and rows[("learner_vs_sampler", k)].rstrip().endswith("ok")
               for k in ROW_KINDS)
    accepted = re.search(r"(\d+)/(\d+) accepted", rows[("weight_names", "all")])
    assert accepted and accepted.group(1) == accepted.group(2) and int(accepted.group(2)) > 10
    from r1_mm.rollout.vllm_colocate import VLLMColocateEngine

    real = VLLMColocateEngine.update_weights

    def first_only(self, model):  # the sync at engine start happens, later ones are lost
        if getattr(self, "_synced_once", False):
            return
        self._synced_once = True
        real(self, model)

    monkeypatch.setattr(VLLMColocateEngine, "update_weights", first_only)
    import r1_mm.models.weights as weights

    real_specs = weights.policy_weight_specs
    # and one exported name the engine's model has no parameter for (as a fused-expert layout would be)
    bogus = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    monkeypatch.setattr(weights, "policy_weight_specs", lambda m: [*real_specs(m), (bogus, [1], "torch.float32")])
    code, out, _ = run(capsys, "tiny:qwen2_5_vl", "--engine", "vllm_colocate")
    rows = table_rows(out)
    assert code == 1, out
    names = rows[("weight_names", "all")]
    assert f"{accepted.group(2)}/{int(accepted.group(2)) + 1} accepted" in names and "FAIL" in names and bogus in names
    assert all("FAIL" in rows[("learner_vs_sampler", k)] and "the sync did not reach the engine" in rows[("learner_vs_sampler", k)]
               for k in ROW_KINDS), out


def _unregistered(monkeypatch, model_type: str) -> None:
    """Make ``model_type`` a family r1-mm has not verified (every reader goes through family_of)."""
    import r1_mm.models.families as families

    real = families.family_of

    def family_of(config):
        if getattr(config, "model_type", None) == model_type:
            raise families.UnsupportedModelError(f"model_type '{model_type}' is not a family r1-mm has verified")
        return real(config)

    monkeypatch.setattr(families, "family_of", family_of)


def _train(tmp_path, synthetic_data, *overrides):
    from r1_mm.jobs.train import main as train_main

    from .test_bad_inputs import RECIPE

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return train_main([str(recipe), f"data.train_path={synthetic_data['counting']}",
                       f"training.output_dir={tmp_path / 'run'}", *overrides])


def test_an_unverified_family_trains_on_hf_after_the_cheap_contract_passed(tmp_path, synthetic_data, tiny_cache,
                                                                          monkeypatch, caplog):
    """Point 5: a model_type outside the table is not refused outright with the hf engine: the cheap contract
    runs on the loaded policy before step 1, and the run trains when it passes."""
    import logging

    import r1_mm.models.contract as contract

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    _unregistered(monkeypatch, "qwen2_5_vl")
    ran = []
    real = contract.cheap_contract
    monkeypatch.setattr(contract, "cheap_contract", lambda *a, **k: ran.append(1) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="r1_mm.trainers.backend"):
        assert _train(tmp_path, synthetic_data, "rollout.engine=hf") == 0
    assert ran == [1]  # the premise: the contract really ran, once, before training
    assert any("not a family r1-mm has verified; the cheap contract" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unverified_family_that_fails_the_contract_stops_before_step_1(tmp_path, synthetic_data, tiny_cache,
                                                                         monkeypatch, capsys):
    """The same model with a planted grouped-forward error (one completion token's logprob shifted):
    one line, exit 2, no step taken."""
    import r1_mm.models.forward.scoring as scoring

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    _unregistered(monkeypatch, "qwen2_5_vl")
    real = scoring.grouped_logprobs

    def off_by_1e3(*args, **kwargs):
        logps, *rest = real(*args, **kwargs)
        return (logps + 1e-3, *rest)

    monkeypatch.setattr(scoring, "grouped_logprobs", off_by_1e3)
    assert _train(tmp_path, synthetic_data, "rollout.engine=hf") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model_type 'qwen2_5_vl' is not a family r1-mm has verified, and the model fails" in err[0]
    assert "grouped_vs_naive" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    # with the naive forward the grouped lines do not count: the same model trains
    assert _train(tmp_path, synthetic_data, "rollout.engine=hf", "training.forward_mode=naive",
                  f"training.output_dir={tmp_path / 'naive'}") == 0


def test_an_engine_the_family_refuses_never_reads_as_a_pass(capsys, monkeypatch):
    """Gemma 3's vLLM engines are refused for a mismatch (image blocks) that shows only once training moved the
    weights, so the engine checks on the tiny weights can pass; the table carries the family's refusal and
    check-model exits 1. (The engine itself is not started here: its lines are what they are.)"""
    import r1_mm.jobs.check_model as job

    monkeypatch.setattr(job, "check_engine", lambda *args, **kwargs: [])
    code, out, _ = run(capsys, "tiny:gemma3", "--engine", "vllm_colocate")
    assert code == 1, out
    line = next(x for x in out.splitlines() if x.startswith("family"))
    assert "refused" in line and "vllm_colocate samples it is not verified" in line and "0.11 nats" in line
