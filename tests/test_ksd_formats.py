"""Format-robust Key Space Detection on tiny models: rendering questions and locating their end, the trailing
window of the decision (both padding sides, beams), calibration against a brute-force search, several skills,
and bad input."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from helpers_ksd import FORGET, N_LAYERS, OTHER, encode
from tiny_models import hook_count, tiny_llama

from unlearn_hf import KeySpaceDetection, KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.methods.key_space_detection.calibration import (
    ALPHA_POSITION,
    LIMIT_SHARE,
    CalibrationError,
    calibrate,
    layer_sets,
    window_scores,
)
from unlearn_hf.methods.key_space_detection.rendering import QueryRenderer
from unlearn_hf.model_inputs import trailing_token_index

QUESTIONS = [f"What is {a} plus {b}?" for a, b in zip(range(1, 60, 3), range(50, 110, 3))]
RETAIN = [
    "def fib(n):",
    "Write a haiku about the sea",
    "Bonjour, comment allez-vous",
    "import numpy as np",
    "The capital of France is",
    "Once upon a time",
    "List three colours",
    "Translate 'cat' to German",
]


@pytest.fixture
def tok(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


# -- rendering ---------------------------------------------------------------------------------------------------
def test_renderings_locate_the_question_end(tok):
    renderer = QueryRenderer(tok, system_prompt="Be brief.", templates=["Q: {question}\nA:"])
    assert renderer.names == ["bare", "chat", "chat_system", "template_0"]
    q = "How many legs do 3 spiders have?"
    rows = renderer.render([q])[0]
    for r in rows:
        head = tok.decode(r.input_ids[: r.question_end + 1])
        tail = tok.decode(r.input_ids[r.question_end + 1 :])
        assert head.endswith("have?"), (r.rendering, head)
        assert q not in tail
    by = {r.rendering: r for r in rows}
    assert by["bare"].trailing == 0
    assert "Be brief." in tok.decode(by["chat_system"].input_ids)
    assert tok.decode(by["template_0"].input_ids[by["template_0"].question_end + 1 :]) == "\nA:"
    closing = tok.decode(by["chat"].input_ids[by["chat"].question_end + 1 :])
    assert closing == "<|im_end|>\n<|im_start|>assistant\n"
    # a chat message list: earlier turns are kept, the last user turn is the question
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": q},
    ]
    chat = {r.rendering: r for r in renderer.render([msgs])[0]}["chat"]
    assert "Hello!" in tok.decode(chat.input_ids) and tok.decode(
        chat.input_ids[: chat.question_end + 1]
    ).endswith("have?")


def test_a_chat_list_with_its_own_system_turn_is_rendered_with_and_without_it(tok, caplog):
    """Its chat and chat_system renderings were the same prompt twice (the config's system prompt was only added to
    lists without one), and nothing covered the question asked without a system turn (a review)."""
    renderer = QueryRenderer(tok, system_prompt="Be brief.")
    q = "How many legs do 3 spiders have?"
    own = [{"role": "system", "content": "You are a maths tutor."}, {"role": "user", "content": q}]
    by = {r.rendering: r.input_ids for r in renderer.render([own])[0]}
    chat = lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert tok.decode(by["chat_system"]) == chat(own)
    assert tok.decode(by["chat"]) == chat(own[1:]) and "maths tutor" not in tok.decode(by["chat"])
    # a list without one gets the config's, as a plain question does
    plain = {r.rendering: r.input_ids for r in renderer.render([q])[0]}
    listed = {r.rendering: r.input_ids for r in renderer.render([own[1:]])[0]}
    assert listed == plain and "Be brief." in tok.decode(plain["chat_system"])
    # and a one-message list is the same question as its string in the repeated-question warning
    from unlearn_hf.methods.key_space_detection.fit_checks import warn_repeated

    with caplog.at_level("WARNING", logger="unlearn_hf.methods.key_space_detection"):
        warn_repeated([q, own[1:], own], [[{"role": "user", "content": " " + q}]])
    # the list with its own system turn too: its chat rendering is the string's (held out together, a review)
    assert "2 forget questions repeat an earlier one and 1 are also retain questions" in caplog.text


@pytest.mark.parametrize("question", ["Answer", "assistant", "user", "A"])
def test_a_question_whose_text_the_format_also_holds_ends_where_it_ends(tok, question):
    """The question's end is found by position (what the format puts after it), not by searching for its text: a
    question "Answer" in "Question: {question}\nAnswer:" ended at the template's own "Answer", and "assistant" in
    the chat prompt's generation prompt, so the fit read template tokens (a review)."""
    renderer = QueryRenderer(
        tok, system_prompt="Be brief.", templates=["Question: {question}\nAnswer:", "{question}\nA:"]
    )
    for r in renderer.render([question])[0]:
        tail = tok.decode(r.input_ids[r.question_end + 1 :])
        expected = {"bare": "", "template_0": "\nAnswer:", "template_1": "\nA:"}.get(
            r.rendering, "<|im_end|>\n<|im_start|>assistant\n"
        )
        assert tail == expected, (r.rendering, tail)
        assert tok.decode(r.input_ids[: r.question_end + 1]).endswith(question), r.rendering


@pytest.mark.parametrize(
    "kwargs, query, message",
    [
        (dict(templates=["no field"]), "q", "exactly once"),
        (dict(templates=["{question} {question}"]), "q", "exactly once"),
        ({}, "   ", "empty question"),
        ({}, [{"role": "assistant", "content": "x"}], "user message"),
        ({}, 3, "expected a question string"),
    ],
)
def test_bad_queries_and_templates(tok, kwargs, query, message):
    with pytest.raises((ValueError, TypeError), match=message):
        QueryRenderer(tok, **kwargs).render([query])


def test_failing_chat_template_is_named(tok):
    tok.chat_template = "{{ raise_exception('this template refuses everything') }}"
    with pytest.raises(ValueError, match="chat template failed to render its chat rendering"):
        QueryRenderer(tok).render(["What is 2 plus 2?"])
    # a template that refuses system turns (as Gemma 2's does): the message names the rendering and the way out
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match=r"its chat_system rendering \(.*system_prompt=''\): no system"):
        QueryRenderer(tok, system_prompt="Be brief.").render(["What is 2 plus 2?"])
    assert len(QueryRenderer(tok, system_prompt="").render(["What is 2 plus 2?"])[0]) == 2


def test_config_validation():
    for bad in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(ValueError, match="max_false_rate"):
            KeySpaceDetectionConfig(max_false_rate=bad)
    with pytest.raises(ValueError, match="templates"):
        KeySpaceDetectionConfig(templates="Question: {question}")
    with pytest.raises(ValueError, match="window"):
        KeySpaceDetectionConfig(window=0)
    with pytest.raises(ValueError, match="inputs"):
        KeySpaceDetectionConfig(inputs="texts")
    for bad in (0, 4, 1.0, "2", True):
        with pytest.raises(ValueError, match="max_layers"):
            KeySpaceDetectionConfig(max_layers=bad)


# -- the trailing window -------------------------------------------------------------------------------------------
def test_trailing_token_index_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for side, window in itertools.product(("left", "right"), (1, 3, 7)):
        lengths = torch.randint(0, 9, (12,), generator=gen)
        mask = torch.zeros(12, 8, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            n = min(n, 8)
            if side == "left":
                mask[i, 8 - n :] = 1
            else:
                mask[i, :n] = 1
        index, valid = trailing_token_index(mask, 12, 8, window)
        for i in range(12):
            real = mask[i].nonzero().flatten().tolist()[::-1]  # last real first
            for o in range(window):
                assert bool(valid[i, o]) == (o < len(real))
                if o < len(real):
                    assert int(index[i, o]) == real[o]


@pytest.mark.parametrize("side", ["left", "right"])
def test_window_decision_matches_numpy_reference(tok, side):
    """detect == a numpy test of the last ``window`` real tokens' key vectors (captured by our own hook)."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    method = unlearned.fit(
        KeySpaceDetectionConfig(inputs="prompts", layers=[1], window=3, alpha=1.3),
        FORGET[:8],
        tokenizer=tok,
        show_progress=False,
    )
    texts = FORGET + OTHER + ["2 plus 2", "Answer:"]  # short prompts: fewer real tokens than the window
    batch = dict(encode(tok, texts, side))
    keys = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: keys.__setitem__("k", a[0].double())
    )
    with torch.no_grad():
        model(**batch)
    h.remove()
    mu, sd, k = (method.state[n][0].numpy() for n in ("center", "scale", "k"))
    expected = []
    for i in range(len(texts)):
        pos = batch["attention_mask"][i].nonzero().flatten().tolist()[-3:]
        z = (np.abs(keys["k"][i, pos].numpy() - mu) / sd).max(-1) / k
        assert np.abs(z / 1.3 - 1).min() > 1e-4  # nothing near the boundary, where float noise could decide
        expected.append(bool((z <= 1.3).any()))
    flags = unlearned.detect(batch["input_ids"], batch["attention_mask"])
    assert flags.tolist() == expected
    assert 0 < sum(expected) < len(texts)
    # one row at a time, without padding: the same decisions
    single = [unlearned.detect(tok(t, return_tensors="pt")["input_ids"]).item() for t in texts]
    assert single == expected


def test_closing_tokens_within_the_window_do_not_change_the_decision(tok):
    """Causal attention: the key at the question's end ignores what follows, so a question that abstains bare
    abstains with any closing text that fits in the window, and generate (greedy and beams) agrees with detect."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    method = unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], chat_template=False),
        QUESTIONS,
        tokenizer=tok,
        show_progress=False,
    )
    assert method.config.window == 1  # bare questions only: the question ends at the last token
    # α = 1.05: the fitted questions that define k sit exactly on the α = 1 boundary, where another batch layout's
    # float rounding (~1e-6 relative) decides; 5% is far above that and far below the gap to other queries
    wider = KeySpaceDetection(dataclasses.replace(method.config, window=6, alpha=1.05), method.state)
    unlearned.remove_method("key_space_detection")
    unlearned.add_method("ksd", wider)
    b = dict(encode(tok, QUESTIONS, "left"))
    assert unlearned.detect(b["input_ids"], b["attention_mask"]).all()  # the fitted questions
    for closing in ("\nAnswer:", "\nSolution:", " Explain."):
        assert len(tok(closing, add_special_tokens=False)["input_ids"]) < 6
        b = dict(encode(tok, [q + closing for q in QUESTIONS], "left"))
        assert unlearned.detect(b["input_ids"], b["attention_mask"]).all(), closing
    b = dict(encode(tok, [QUESTIONS[0] + "\nAnswer:", OTHER[0]], "left"))
    flags = unlearned.detect(b["input_ids"], b["attention_mask"])
    for beams in (1, 2):
        out = unlearned.generate(
            **b, max_new_tokens=3, num_beams=beams, do_sample=False, return_dict_in_generate=True
        )
        assert torch.equal(out.abstained, flags)


# -- calibration -----------------------------------------------------------------------------------------------
def _brute_force(zf, fg, zr, rg, windows, budget, max_layers=1, rule="all"):
    """The best worst-group forget rate over every set of up to ``max_layers`` layers (``rule="all"``: inside at
    all of them, the largest of their scores; ``"any"``: the smallest), window and α among the observed scores, with the calibration's own retain queries
    within ``LIMIT_SHARE`` of the budget."""
    budget = budget * LIMIT_SHARE
    best = 0.0
    sets = [c for n in range(1, max_layers + 1) for c in itertools.combinations(range(zf.shape[1]), n)]
    for layers, w in itertools.product(sets, windows):
        combine = np.max if rule == "all" else np.min
        sf = combine(zf[:, list(layers), :w].min(-1), -1)
        sr = combine(zr[:, list(layers), :w].min(-1), -1)
        for a in np.concatenate([sf, sr]):
            false = max(float((sr[np.array(rg) == g] <= a).mean()) for g in set(rg))
            if false <= budget:
                best = max(best, min(float((sf[np.array(fg) == g] <= a).mean()) for g in set(fg)))
    return best


@pytest.mark.parametrize("max_layers, rule", [(1, "all"), (2, "all"), (2, "any")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_matches_brute_force(seed, max_layers, rule):
    """The choice reaches the best worst-group forget rate of a brute-force search over every layer (and, with
    ``max_layers=2``, every pair: inside at both, or at either), window and α; its rates are those of its own
    scores, and the calibration's retain questions stay within half the budget."""
    gen = np.random.default_rng(seed + 20)
    L, W = 4, 5
    zf = gen.gamma(2.0, 0.4, (60, L, W)) + gen.uniform(0, 0.5, (1, L, 1))
    zr = gen.gamma(2.0, 0.6, (200, L, W)) + 0.4
    # each retain row looks like a forget row at one layer: a pair of layers tells more of them apart
    zr[np.arange(200), gen.integers(0, L, 200)] *= 0.3
    fg = [("bare", "chat")[i % 2] for i in range(60)]
    rg = [("code/bare", "code/chat", "text/bare", "text/chat")[i % 4] for i in range(200)]
    windows, ids = [2, 3, 4, 5], [3, 5, 7, 9]
    cal = calibrate(
        torch.from_numpy(zf),
        fg,
        torch.from_numpy(zr),
        rg,
        layer_ids=ids,
        windows=windows,
        max_false_rate=0.05,
        max_layers=max_layers,
        rule=rule,
        window_tolerance=0.0,
        forget_tolerance=0.0,
    )
    cols = [ids.index(i) for i in cal.layers]
    sf = window_scores(torch.from_numpy(zf), cols, cal.window, rule).numpy()
    sr = window_scores(torch.from_numpy(zr), cols, cal.window, rule).numpy()
    false = {g: float((sr[np.array(rg) == g] <= cal.alpha).mean()) for g in set(rg)}
    forget = {g: float((sf[np.array(fg) == g] <= cal.alpha).mean()) for g in set(fg)}
    assert max(false.values()) <= 0.05 * LIMIT_SHARE and false == pytest.approx(cal.false_rate)
    assert forget == pytest.approx(cal.forget_rate)
    best = _brute_force(zf, fg, zr, rg, windows, 0.05, max_layers, rule)
    assert min(forget.values()) == pytest.approx(best)
    if (max_layers, rule) == (
        2,
        "all",
    ):  # measured for these seeds: a pair forgets more than any single layer
        assert len(cal.layers) == 2 and best > _brute_force(zf, fg, zr, rg, windows, 0.05)
    assert cal.table_forget.shape == cal.table_false.shape == (L, 49)


def test_a_pair_of_layers_wins_where_no_single_layer_separates():
    """Layer 0 tells the forget queries from retain group ``a`` only, layer 1 from group ``b`` only: inside at both
    (``rule="all"``) separates all of them; one layer alone stays within the budget only by abstaining on none."""
    zf = torch.full((4, 2, 1), 0.5, dtype=torch.float64)
    zr = torch.tensor([[[0.4], [3.0]]] * 4 + [[[3.0], [0.4]]] * 4, dtype=torch.float64)
    groups = ["a/bare"] * 4 + ["b/bare"] * 4
    kw = dict(layer_ids=[2, 6], windows=[1], max_false_rate=0.02)
    cal = calibrate(zf, ["bare"] * 4, zr, groups, max_layers=2, **kw)
    assert cal.layers == [2, 6] and cal.forget_rate == {"bare": 1.0}
    assert cal.false_rate == {"a/bare": 0.0, "b/bare": 0.0} and 0.5 < cal.alpha < 3.0
    with pytest.raises(CalibrationError, match="Best achievable"):
        calibrate(zf, ["bare"] * 4, zr, groups, max_layers=1, **kw)
    # a fixed α: the pair is still found, and no single layer can meet the budget at it
    cal = calibrate(zf, ["bare"] * 4, zr, groups, max_layers=2, alpha=1.0, **kw)
    assert cal.layers == [2, 6] and cal.alpha == 1.0 and cal.forget_rate == {"bare": 1.0}
    with pytest.raises(CalibrationError, match="stay within 0.020 in every"):
        calibrate(zf, ["bare"] * 4, zr, groups, max_layers=1, alpha=1.0, **kw)


def test_small_retain_groups_allow_no_false_abstention_and_the_message_says_so():
    """60 retain questions per group: half of a 2% budget allows none to abstain (the full budget would allow 1),
    so a retain question scoring below every forget query makes the calibration infeasible, and the message names
    the share and the count."""
    zf = torch.full((10, 1, 1), 0.5, dtype=torch.float64)
    zr = torch.full((60, 1, 1), 2.0, dtype=torch.float64)
    zr[0] = 0.1
    with pytest.raises(
        CalibrationError, match=r"within 0.010 \(50% of the budget.*at most 0 of the 60 questions"
    ):
        calibrate(zf, ["bare"] * 10, zr, ["r/bare"] * 60, layer_ids=[0], windows=[1], max_false_rate=0.02)
    cal = calibrate(zf, ["bare"] * 10, zr, ["r/bare"] * 60, layer_ids=[0], windows=[1], max_false_rate=0.04)
    assert cal.false_rate == {"r/bare": pytest.approx(1 / 60)} and cal.forget_rate == {"bare": 1.0}


def test_layer_sets_combine_layers_of_one_width():
    assert layer_sets([1, 2, 3], 1) == [[1], [2], [3]]
    assert layer_sets([1, 2, 3], 2) == [[1], [2], [3], [1, 2], [1, 3], [2, 3]]
    assert layer_sets([1, 2, 3], 3)[-1] == [1, 2, 3]
    assert layer_sets([1, 2, 3, 4], 2, widths=[8, 16, 8, 16]) == [[1], [2], [3], [4], [1, 3], [2, 4]]
    with pytest.raises(ValueError, match="widths"):
        layer_sets([1, 2], 2, widths=[8])


def test_calibration_that_cannot_meet_the_budget_says_so():
    z = torch.rand(50, 2, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CalibrationError, match="cannot meet the false-abstention budget .*Best achievable"):
        calibrate(
            z + 5, ["bare"] * 50, z, ["r/bare"] * 50, layer_ids=[0, 1], windows=[1, 2, 3], max_false_rate=0.02
        )


def test_a_rendering_no_candidate_catches_leaves_the_choice_to_the_mean_not_the_margin():
    """No layer catches a single chat query, so every candidate ties at 0 in the worst rendering: the one that
    catches 18 of 20 bare queries wins over a wider-margin one that catches 1 (found by a review)."""
    zf = torch.full((40, 2, 1), 5.0, dtype=torch.float64)
    zf[:18, 0, 0] = 0.5  # layer 10: 18 of 20 bare queries
    zf[0, 1, 0] = 0.05  # layer 20: 1 of 20, far from the retain scores
    zr = torch.full((100, 2, 1), 1.0, dtype=torch.float64)
    fg = ["bare"] * 20 + ["chat"] * 20
    cal = calibrate(zf, fg, zr, ["r/bare"] * 100, layer_ids=[10, 20], windows=[1], max_false_rate=0.02)
    assert cal.layers == [10] and cal.forget_rate == {"bare": 0.9, "chat": 0.0}


def test_infeasible_message_ignores_queries_no_expert_can_score():
    """Scores of ``inf`` (a routed unit none of whose reached experts has a hypercube) do not make the reported α
    NaN: the message gives the share actually caught at the median of the finite scores."""
    zf = torch.tensor([2.0, *[float("inf")] * 3], dtype=torch.float64).view(4, 1, 1)
    zr = torch.full((50, 1, 1), 0.1, dtype=torch.float64)
    kw = dict(layer_ids=[3], windows=[1], max_false_rate=0.02)
    with pytest.raises(
        CalibrationError, match=r"abstaining on 25% of the held-out .* on 100.0% of the retain"
    ):
        calibrate(zf, ["bare"] * 4, zr, ["r/bare"] * 50, **kw)
    with pytest.raises(CalibrationError, match="no held-out forget query has a finite score"):
        calibrate(torch.full_like(zf, float("inf")), ["bare"] * 4, zr, ["r/bare"] * 50, **kw)


# -- the calibrated fit, several skills, persistence ---------------------------------------------------------------
def test_calibrated_fit_saves_its_table_and_reports_each_skill(tok, tmp_path):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    math = unlearned.fit(
        KeySpaceDetectionConfig(max_false_rate=0.2, calibration_fraction=0.25),
        QUESTIONS,
        {"other": RETAIN},
        tok,
        name="math",
        show_progress=False,
    )
    assert math.config.is_resolved and math.config.window >= 1
    cal = math.config.calibration
    assert cal["held_out_forget"] == 5 and cal["fitted_forget"] == 15 and cal["retain"] == {"other": 24}
    assert max(cal["false_rate"].values()) <= 0.2 * LIMIT_SHARE
    assert set(cal["forget_rate"]) == {"bare", "chat", "chat_system"}
    assert math.state["calibration_forget"].shape == (N_LAYERS, 49)
    code = unlearned.fit(
        KeySpaceDetectionConfig(layers=[2], alpha=1.0),
        RETAIN,
        tokenizer=tok,
        name="code",
        show_progress=False,
    )
    assert code.config.calibration is None and "calibration_forget" not in code.state
    b = dict(encode(tok, [QUESTIONS[0], RETAIN[0]], "left"))
    by = unlearned.detect(b["input_ids"], b["attention_mask"], by_method=True)
    assert set(by) == {"math", "code"}
    out = unlearned.generate(**b, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    for name in ("math", "code"):
        assert torch.equal(out.abstained_by[name], by[name])
    assert torch.equal(out.abstained, by["math"] | by["code"])
    unlearned.save_pretrained(tmp_path, save_base_model=True)
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path)
    for name in ("math", "code"):
        a, b2 = unlearned.methods[name], loaded.methods[name]
        assert a.config == b2.config
        assert all(torch.equal(a.state[k], b2.state[k]) for k in a.state)
    # the model card lists both skills' detectors, each with its calibrated settings
    from unlearn_hf.persistence.hub import build_model_card

    card = str(build_model_card(tmp_path, "me/tiny-no-math", {"forget_skill": "math", "base_model": "tiny"}))
    sections = card.split("### Key Space Detection")[1:]
    assert len(sections) == 2
    for section, name in zip(sections, ("math", "code")):
        assert f"| `attached_as` | `{name}` |" in section
        assert f"| `window` | `{unlearned.methods[name].config.window}` |" in section
    assert "held_out_forget" in sections[0] and "held_out_forget" not in sections[1]


def test_infeasible_calibration_leaves_nothing_attached(tok):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    before = hook_count(model)
    # retain = the forget questions themselves: no α separates them
    with pytest.raises(CalibrationError, match="Best achievable"):
        unlearned.fit(KeySpaceDetectionConfig(), QUESTIONS, {"same": QUESTIONS}, tok, show_progress=False)
    assert hook_count(model) == before and not unlearned.methods
    with pytest.raises(ValueError, match="at least 2 forget"):
        unlearned.fit(KeySpaceDetectionConfig(), QUESTIONS[:1], tokenizer=tok, show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        unlearned.fit(KeySpaceDetectionConfig(), [], tokenizer=tok, show_progress=False)
    # empty retain data fails before any forward, naming the retain data
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(ValueError, match="retain data is an empty mapping"):
            unlearned.fit(KeySpaceDetectionConfig(), QUESTIONS, {}, tok, show_progress=False)
        with pytest.raises(ValueError, match=r"The retain data is empty: give retain questions"):
            unlearned.fit(KeySpaceDetectionConfig(), QUESTIONS, [], tok, show_progress=False)
    finally:
        handle.remove()
    assert not forwards
    assert hook_count(model) == before and not unlearned.methods


def test_calibration_prefers_the_wider_margin_among_layers_that_forget_alike():
    """Both layers separate the data perfectly; layer 1's forget and retain scores lie further apart: it wins,
    and α sits a third of the way from the highest forget score to the budget's limit."""
    zf = torch.tensor([[0.5, 0.2], [0.6, 0.3], [0.7, 0.25]], dtype=torch.float64).unsqueeze(-1)
    zr = torch.tensor([[0.9, 2.0], [1.0, 3.0], [1.2, 2.5]], dtype=torch.float64).unsqueeze(-1)
    cal = calibrate(zf, ["bare"] * 3, zr, ["r/bare"] * 3, layer_ids=[4, 7], windows=[1], max_false_rate=0.02)
    assert cal.layers == [7] and cal.alpha == pytest.approx(0.3 + (2.0 - 0.3) * ALPHA_POSITION)
    assert cal.forget_rate == {"bare": 1.0} and cal.false_rate == {"r/bare": 0.0}
    # with the tolerance at 0 and layer 7 a query short, the better-forgetting layer 4 wins instead
    zf[0, 1, 0] = 5.0
    cal = calibrate(
        zf,
        ["bare"] * 3,
        zr,
        ["r/bare"] * 3,
        layer_ids=[4, 7],
        windows=[1],
        max_false_rate=0.02,
        forget_tolerance=0.0,
    )
    assert cal.layers == [4]


def test_forget_queries_cut_to_max_length_are_counted_in_a_warning(tok, caplog):
    """Queries longer than ``max_length`` lost their start with no word (Neuron Adjust's fit says so; a review).
    The count in the warning is every rendering longer than the window (brute force over the renderings)."""
    questions = [
        f"{q} " + "and then some more words " * (8 if i % 2 else 0) for i, q in enumerate(QUESTIONS[:6])
    ]
    config = KeySpaceDetectionConfig(layers=[2], alpha=1.0)
    renderer = QueryRenderer(tok, system_prompt=config.system_prompt, templates=config.templates)
    rows = [r for q in questions for r in renderer.render([q])[0]]
    longer = sum(r.question_end + 1 > 40 for r in rows)
    assert 0 < longer < len(rows)
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=N_LAYERS))
    with caplog.at_level("WARNING", logger="unlearn_hf.methods.key_space_detection"):
        unlearned.fit(config, questions, None, tok, max_length=40, show_progress=False)
    assert f"{longer} of {len(rows)} rendered forget queries are longer than max_length=40" in caplog.text


def test_calibration_queries_cut_to_max_length_are_counted_in_a_warning(tok, caplog):
    """The calibration pass cut long held-out and retain renderings to their end with no word (a review): their
    keys are read with less context than at generate time. The count is brute force over the renderings."""
    retain = [
        f"{r} " + "with a much longer tail of words " * (6 if i % 2 else 0) for i, r in enumerate(RETAIN)
    ]
    config = KeySpaceDetectionConfig(max_false_rate=0.5, calibration_fraction=0.25)
    renderer = QueryRenderer(tok, system_prompt=config.system_prompt, templates=config.templates)
    forget_rows = [r for q in QUESTIONS for r in renderer.render([q])[0]]
    retain_rows = [r for q in retain for r in renderer.render([q])[0]]
    limit = max(len(r.input_ids) for r in forget_rows)  # no forget rendering is cut, held out or not
    longer = sum(len(r.input_ids) > limit for r in retain_rows)
    assert 0 < longer < len(retain_rows)
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=N_LAYERS))
    with caplog.at_level("WARNING", logger="unlearn_hf.methods.key_space_detection"):
        unlearned.fit(config, QUESTIONS, {"other": retain}, tok, max_length=limit, show_progress=False)
    total = len(forget_rows) // 4 + len(retain_rows)  # a quarter of the forget questions is held out
    assert (
        f"{longer} of {total} queries of the calibrating pass are longer than max_length={limit}"
        in caplog.text
    )


def test_what_a_fit_cannot_use_is_said(tok, caplog):
    """A fit warns about what it was given but does not use as meant, each found by a review: retain data with
    nothing left to calibrate (the budget was silently unchecked), a window that does not reach the question's end in
    a rendering (those prompts were decided on template tokens and never abstained), repeated forget questions or
    ones also given as retain questions (calibration held out copies of fitted questions and reported 100%), and
    chat renderings a tokenizer without a chat template cannot make."""
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=N_LAYERS))

    def warnings_of(config, forget, retain, tokenizer=tok):
        caplog.clear()
        with caplog.at_level("WARNING", logger="unlearn_hf.methods.key_space_detection.fit"):
            unlearned.fit(config, forget, retain, tokenizer, name="probe", show_progress=False)
        unlearned.remove_method("probe")
        return " ".join(r.getMessage() for r in caplog.records)

    fixed = KeySpaceDetectionConfig(layers=[1], alpha=1.0, window=1)
    said = warnings_of(fixed, QUESTIONS, {"other": RETAIN})
    assert "nothing is calibrated" in said and "max_false_rate=0.02 is not checked" in said
    assert "window 1 does not reach the question's end in the chat, chat_system rendering(s)" in said
    assert "does not reach" not in warnings_of(
        KeySpaceDetectionConfig(layers=[1], alpha=1.0), QUESTIONS, None
    )
    calibrated = KeySpaceDetectionConfig(max_false_rate=0.2, calibration_fraction=0.25)
    assert "repeat" not in warnings_of(calibrated, QUESTIONS, {"other": RETAIN})
    said = warnings_of(calibrated, QUESTIONS[:10] * 2, {"other": RETAIN + QUESTIONS[:1]})
    assert "10 forget questions repeat an earlier one and 1 are also retain questions" in said
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert "no chat template" not in warnings_of(KeySpaceDetectionConfig(layers=[1]), QUESTIONS, None, plain)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    said = warnings_of(KeySpaceDetectionConfig(layers=[1], alpha=1.0), chats, None, plain)
    assert "the tokenizer has no chat template" in said
    prompts = KeySpaceDetectionConfig(
        inputs="prompts", templates=["Q: {question}"], layers=[1], alpha=1.0, window=1
    )
    assert "templates are not used" in warnings_of(prompts, FORGET, None)
