"""Tests of the unlearned-model card."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from unlearn_hf.model_card import ModelCardInfo, _template_text, method_tag, render_model_card


def _info(**overrides) -> ModelCardInfo:
    kwargs = dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        base_model_revision="0123abc",
        forget_skill="math",
        retain_skills=["python", "english"],
        forget_data="GSM8K train, 200 questions",
        retain_data="MBPP train | 200 problems",
        methods=[
            {"name": "neuron_adjust", "config": {"top_k_ratio": 0.02, "layers": [3, 4]}},
            {"name": "key_space_detection", "config": {"threshold": 0.9}},
        ],
        evaluation=[
            {
                "method": "neuron_adjust",
                "skill": "math",
                "metric": "accuracy",
                "before": 0.4215,
                "after": 0.05,
            },
            {
                "method": "neuron_adjust",
                "skill": "python",
                "metric": "pass@1",
                "before": 0.3,
                "after": 0.29,
                "relative_drop": 0.0333,
            },
        ],
        library_version="9.9.9",
        repo_id="someone/smollm2-no-math",
        license="apache-2.0",
        tags=["math"],
    )
    kwargs.update(overrides)
    return ModelCardInfo(**kwargs)


def test_metadata_round_trip(tmp_path: Path) -> None:
    card = render_model_card(_info())
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    data = loaded.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["library_name"] == "unlearn_hf"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    for tag in (
        "unlearn_hf",
        "machine-unlearning",
        "skill-unlearning",
        "neuron-adjust",
        "key-space-detection",
    ):
        assert tag in data["tags"]
    assert "math" in data["tags"]
    assert len(data["tags"]) == len(set(data["tags"]))
    assert loaded.text == card.text


def test_body_content() -> None:
    text = render_model_card(_info()).text
    # what was unlearned, with which data
    assert "**math**" in text and "python, english" in text
    assert "GSM8K train, 200 questions" in text
    assert "MBPP train \\| 200 problems" in text  # table-safe
    assert "0123abc" in text and "9.9.9" in text
    # methods and their settings
    assert "Neuron Adjust (`neuron_adjust`)" in text and "Key Space Detection (`key_space_detection`)" in text
    assert "| `top_k_ratio` | `0.02` |" in text and "| `layers` | `[3, 4]` |" in text
    # evaluation table, relative drop computed when missing
    assert "## Evaluation" in text
    assert "| neuron_adjust | math | accuracy | 0.4215 | 0.05 | 88.1% |" in text
    assert "| neuron_adjust | python | pass@1 | 0.3 | 0.29 | 3.3% |" in text
    # usage and citation
    assert 'UnlearnedModelForCausalLM.from_pretrained("someone/smollm2-no-math")' in text
    assert "model.generate(" in text
    assert "2503.21730" in text and "Effective Skill Unlearning through Intervention and Abstention" in text


def test_warning_is_prominent() -> None:
    text = render_model_card(_info()).text
    warning_at = text.index("> [!WARNING]")
    assert warning_at < text.index("## What was unlearned")
    assert "AutoModelForCausalLM" in text[warning_at:]
    assert "restores the math skill" in text


def test_evaluation_section_omitted_without_results() -> None:
    text = render_model_card(_info(evaluation=None)).text
    assert "## Evaluation" not in text and "Relative drop" not in text
    assert "## Usage" in text
    assert "## Evaluation" not in render_model_card(_info(evaluation=[])).text


def test_evaluation_without_method_column() -> None:
    rows = [{"skill": "math", "metric": "accuracy", "before": 0.5, "after": 0.25}]
    text = render_model_card(_info(evaluation=rows)).text
    assert "| Skill | Metric | Before | After | Relative drop |" in text
    assert "| math | accuracy | 0.5 | 0.25 | 50.0% |" in text


def test_minimal_info_and_local_base_model() -> None:
    info = ModelCardInfo(
        base_model="./checkpoints/base",
        forget_skill="python",
        methods=[{"name": "selective_pruning"}],
        repo_id="me/x",
    )
    card = render_model_card(info)
    assert card.data.tags[-1] == "selective-pruning"
    assert "Default settings." in card.text
    assert "https://huggingface.co/./checkpoints" not in card.text
    assert card.data.license is None
    # no Hub id: the Hub refuses a base_model that names no model (a review), and the path stays private
    assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    assert "./checkpoints" not in card.text and "`base`" in card.text
    hub = render_model_card(dataclasses.replace(info, base_model="org/base"))
    assert hub.data.base_model == "org/base" and "https://huggingface.co/org/base" in hub.text


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"methods": []}, "methods is empty"),
        ({"methods": [{"config": {}}]}, "non-empty 'name'"),
        ({"methods": [{"name": "neuron_adjust", "config": [1]}]}, "must be a dict"),
        ({"forget_skill": ""}, "forget_skill"),
        ({"base_model": "  "}, "base_model"),
        ({"evaluation": [{"skill": "math", "before": 1.0}]}, "lacks"),
    ],
)
def test_bad_input_raises(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_model_card(_info(**overrides))


def test_method_tag() -> None:
    assert method_tag("neuron_adjust") == "neuron-adjust"
    assert method_tag("Key Space Detection") == "key-space-detection"
    assert method_tag("selective-pruning") == "selective-pruning"


def test_template_found() -> None:
    text = _template_text()
    assert text.startswith("---\n{{ card_data }}\n---")


def test_card_push_through_loopback_hub(tmp_path: Path) -> None:
    from hub_server import hub_env, start_hub_server
    from huggingface_hub import HfApi

    card = render_model_card(_info(repo_id="test-user/no-math"))
    with start_hub_server(tmp_path) as hub, hub_env(hub.endpoint, tmp_path / "cache", token="hf_x"):
        HfApi().create_repo("no-math")
        card.push_to_hub("test-user/no-math")
        info = HfApi().model_info("test-user/no-math")
        assert info.card_data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert info.library_name == "unlearn_hf" and "neuron-adjust" in info.tags
        assert ModelCard.load("test-user/no-math").text == card.text
        assert any(r.path == "/api/validate-yaml" for r in hub.requests)


def test_each_method_says_what_it_does_and_named_methods_are_told_apart() -> None:
    """Two Key Space Detection methods attached as ``math`` and ``code`` get headings of their own, and every
    registered method's section says what it does and where it stops (a review found identical headings and no
    word on what the methods do)."""
    from unlearn_hf import KeySpaceDetection, NeuronAdjust

    methods = [
        {"name": "neuron_adjust", "config": {"ratio": 0.03}},
        {"name": "key_space_detection", "config": {"attached_as": "math", "alpha": 1.0}},
        {"name": "key_space_detection", "config": {"attached_as": "code", "alpha": 1.0}},
    ]
    text = render_model_card(_info(methods=methods)).text
    assert "### Neuron Adjust (`neuron_adjust`)" in text
    assert "### Key Space Detection `math` (`key_space_detection`)" in text
    assert "### Key Space Detection `code` (`key_space_detection`)" in text
    assert text.count(KeySpaceDetection.summary) == 2 and text.count(NeuronAdjust.summary) == 1
    assert "calibration's retain questions" in KeySpaceDetection.summary


def test_every_registered_method_has_a_summary_for_its_card() -> None:
    from unlearn_hf.methods.registry import METHOD_CLASSES, discover

    discover()
    assert METHOD_CLASSES and all(cls.summary.strip() for cls in METHOD_CLASSES.values())


def test_several_forget_skills_are_named_together() -> None:
    """Several Key Space Detection skills on one model: the card named one (a review)."""
    card = render_model_card(_info(forget_skill=["math", "python", "French"]))
    assert "**math, python and French** skills are suppressed" in card.text
    assert "restores the math, python and French skills" in card.text
    assert "| Forgotten skills | **math, python and French** |" in card.text
    one = render_model_card(_info(forget_skill=["math"]))
    assert one.text == render_model_card(_info()).text  # a list of one is the string
    assert "> skills cannot be recovered." in card.text
    for bad in ([], (), ["math", " "], [3]):
        with pytest.raises(ValueError, match="forget_skill must be a non-empty string or a list of them"):
            render_model_card(_info(forget_skill=bad))
