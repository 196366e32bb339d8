"""Sigmoid-scored routing (DeepSeek-V3 style) in the native model and under every router: the
scores, the selection bias and its auxiliary-loss-free updates, grouped selection, the gates'
normalisation and factor, shared experts, and what the Bayesian routers do with sigmoid scores."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vrmoe.checkpoint import load_checkpoint
from vrmoe.config import ConfigError
from vrmoe.model import build_model
from vrmoe.model.routers import ROUTERS, build_router, router_config
from vrmoe.model.routers.base import ScoreMean, Scoring, gumbel_perturbed
from vrmoe.model.routers.variational import LogitPosterior
from vrmoe.train import train

from conftest import TINY, make_config

D_MODEL, N_EXPERTS = 16, 8
SIGMOID = dict(scoring_func="sigmoid")


def make_router(name: str, **fields) -> torch.nn.Module:
    own = {f.name for f in dataclasses.fields(ROUTERS[name].Config)}
    torch.manual_seed(0)
    return build_router(D_MODEL, N_EXPERTS, router_config(name, **{k: v for k, v in fields.items() if k in own}))


def tokens(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(1))


def loads(ids_TK: torch.Tensor, n_experts: int = N_EXPERTS) -> torch.Tensor:
    return torch.bincount(ids_TK.reshape(-1), minlength=n_experts).float()


# ---------------------------------------------------------------------------
# The deterministic baseline: scores, bias, groups, gates
# ---------------------------------------------------------------------------

def test_sigmoid_top_k_selects_on_scores_plus_bias_and_gates_with_the_scores_alone():
    router = make_router("topk", k=2, **SIGMOID).eval()
    u = tokens()
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, N_EXPERTS))
        routing = router(u)
        scores_TE = router.gate(u).sigmoid()
    want_TK = (scores_TE + router.e_score_correction_bias).topk(2, dim=-1).indices
    assert torch.equal(routing.expert_ids_TK.sort(-1).values, want_TK.sort(-1).values)
    selected_TK = scores_TE.gather(-1, routing.expert_ids_TK)  # the bias never reaches the gates
    torch.testing.assert_close(routing.gates_TK, selected_TK / selected_TK.sum(-1, keepdim=True))
    # The routing distribution is the scores normalised; the bias changed some selections.
    torch.testing.assert_close(routing.probs_TE, scores_TE / scores_TE.sum(-1, keepdim=True))
    assert not torch.equal(want_TK.sort(-1).values, scores_TE.topk(2, dim=-1).indices.sort(-1).values)


def test_unnormalised_gates_times_the_scaling_factor():
    router = make_router("topk", k=2, norm_topk_prob=False, routed_scaling_factor=2.5, **SIGMOID).eval()
    u = tokens()
    with torch.no_grad():
        routing = router(u)
        scores_TE = router.gate(u).sigmoid()
    torch.testing.assert_close(routing.gates_TK, scores_TE.gather(-1, routing.expert_ids_TK) * 2.5)


def test_grouped_selection_keeps_the_best_groups_by_their_best_two_scores():
    router = make_router("topk", k=2, n_group=4, topk_group=2, **SIGMOID).eval()
    u = tokens(256)
    with torch.no_grad():
        routing = router(u)
        choice_TGX = router.gate(u).sigmoid().view(-1, 4, 2)
    kept_TG = torch.zeros(256, 4, dtype=torch.bool).scatter_(-1, choice_TGX.sum(-1).topk(2, dim=-1).indices, True)
    group_TK = routing.expert_ids_TK // 2
    assert bool(kept_TG.gather(-1, group_TK).all())
    plain_TK = choice_TGX.view(-1, N_EXPERTS).topk(2, dim=-1).indices.sort(-1).values
    assert (plain_TK != routing.expert_ids_TK.sort(-1).values).any(dim=-1).float().mean() > 0.05


def test_the_bias_moves_one_step_towards_balance_per_training_forward_and_only_in_training():
    router = make_router("topk", k=2, bias_update_speed=0.01, **SIGMOID)
    u = tokens(128)
    with torch.no_grad():
        router.gate.weight[0] += 1.0  # expert 0 is everyone's favourite
        router.eval()
        router(u)
        assert not router.e_score_correction_bias.any()  # evaluation moves nothing
        router.train()
        load_E = loads(router(u).expert_ids_TK)
        assert not router.e_score_correction_bias.any()  # the move waits for the step's update
        router.settle_bias_update(apply=True)
    step_E = (load_E.mean() - load_E).sign() * 0.01
    torch.testing.assert_close(router.e_score_correction_bias, step_E)
    assert router.e_score_correction_bias[0] < 0
    # Repeated steps balance the load without any loss term (steps small against the scores' gaps).
    router.cfg = dataclasses.replace(router.cfg, bias_update_speed=1e-3)
    with torch.no_grad():
        for _ in range(500):
            router(u)
            router.settle_bias_update(apply=True)
        after = loads(router(u).expert_ids_TK)
    assert after.std() < 0.3 * load_E.std()


def test_a_skipped_non_finite_step_moves_the_bias_no_more_than_the_weights():
    """The training step applies a forward's bias move only with its update: a step skipped because
    its loss is not finite leaves the bias (and the weights) as they were; the next finite one moves it."""
    from vrmoe.train.step import TrainStep, make_optimizer

    app = make_config(*TINY, "router.scoring_func=sigmoid", "router.bias_update_speed=0.01", "train.max_bad_steps=5")
    torch.manual_seed(0)
    model = build_model(app)
    step = TrainStep(model, make_optimizer(model, 1e-3, 0.0), app.train, torch.device("cpu"))
    x = torch.randint(0, app.model.vocab_size, (2, app.model.seq_len))
    biases = lambda: [r.e_score_correction_bias.clone() for r in step.balancing]  # noqa: E731
    assert len(step.balancing) == app.model.n_layers
    before, weights = biases(), [p.detach().clone() for p in model.parameters()]

    def poisoned():
        out = model(x, x)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    step(0, poisoned)
    assert not step.last_ok and all(torch.equal(a, b) for a, b in zip(biases(), before))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    step(1, lambda: model(x, x))
    assert step.last_ok and all(not torch.equal(a, b) for a, b in zip(biases(), before))


def test_the_softmax_router_has_no_bias_unless_its_training_moves_one():
    assert make_router("topk", k=2).e_score_correction_bias is None
    assert "e_score_correction_bias" not in make_router("topk", k=2).state_dict()
    for fields in (SIGMOID, dict(bias_update_speed=1e-3)):
        assert "e_score_correction_bias" in make_router("variational", k=2, **fields).state_dict()


def test_native_sigmoid_model_with_bias_groups_and_shared_experts_trains_and_keeps_its_bias(tmp_path):
    routing = ["model.n_experts=8", "model.n_shared_experts=1", "router.scoring_func=sigmoid", "router.n_group=4",
               "router.topk_group=2", "router.routed_scaling_factor=2.0"]
    app = make_config(*TINY, *routing, "train.max_steps=4", "router.bias_update_speed=0.01")
    assert train(app, tmp_path / "base")["status"] == "completed"
    state = load_checkpoint(tmp_path / "base", "run")["model"]
    biases = {k: v for k, v in state.items() if k.endswith("e_score_correction_bias")}
    assert len(biases) == 2 and all(b.abs().max() > 0 for b in biases.values())  # two MoE layers, each moved
    # The shared experts are one SwiGLU of width n_shared_experts * expert_hidden per MoE layer.
    model = build_model(app)
    assert model.blocks[0].shared_experts.w1.weight.shape == (app.model.expert_hidden, app.model.d_model)
    # Post hoc: the variational router on the frozen sigmoid base selects with the base's bias.
    posthoc = make_config(*TINY, *routing, "router=variational", "train.freeze=backbone",
                          f"train.init_from={tmp_path / 'base'}", "train.max_steps=2")
    train(posthoc, tmp_path / "posthoc")
    after = load_checkpoint(tmp_path / "posthoc", "run")["model"]
    for key, bias in biases.items():
        assert torch.equal(after[key], bias)  # bias_update_speed=0: loaded, kept, saved


def test_shared_experts_add_their_flops_and_stay_active():
    plain = build_model(make_config("model=tiny"))
    shared = build_model(make_config("model=tiny", "model.n_shared_experts=2"))
    d, hidden = shared.cfg.d_model, shared.cfg.expert_hidden
    extra = shared.flops_per_token(1).other - plain.flops_per_token(1).other
    assert extra == len(shared.moe_layers) * 3 * 2 * d * 2 * hidden
    counts, base = shared.parameter_counts(), plain.parameter_counts()
    assert counts["active"] - base["active"] == counts["total"] - base["total"]  # every shared weight is active


@pytest.mark.parametrize("override, words", [
    ("router.scoring_func=tanh", "router.scoring_func='tanh' must be softmax or sigmoid"),
    ("router.n_group=3", "router.n_group=3 must divide model.n_experts=4"),
    ("router.topk_group=3", "router.topk_group=3 is out of range; it must be in [1, router.n_group=1]"),
    ("router.bias_update_speed=-1", "router.bias_update_speed=-1.0 must be >= 0"),
    ("router.routed_scaling_factor=0", "router.routed_scaling_factor=0.0 must be > 0"),
    ("model.n_shared_experts=-1", "model.n_shared_experts=-1 must be >= 0"),
])
def test_bad_values_are_one_line(override, words):
    with pytest.raises(ConfigError) as err:
        make_config("model=tiny", override)
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_k_must_fit_in_the_kept_groups_and_probit_needs_sigmoid_scores():
    with pytest.raises(ConfigError, match=r"^K=2 experts do not fit in router.topk_group=1 group\(s\) of 1"):
        make_config("model=tiny", "router.n_group=4", "router.topk_group=1")
    with pytest.raises(ConfigError, match=r"^router.sigmoid_mean=probit averages sigmoid scores, but "
                                          r"router.scoring_func=softmax; set router.scoring_func=sigmoid"):
        make_config("model=tiny", "router=variational", "router.sigmoid_mean=probit")
    make_config("model=tiny", "router=variational", "router.sigmoid_mean=probit", "router.scoring_func=sigmoid")


# ---------------------------------------------------------------------------
# The Bayesian routers under sigmoid scores
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_router_routes_with_sigmoid_scores_and_the_bias(name):
    router = make_router(name, k=2, samples=4, swag_start=0, bias_update_speed=1e-2, n_group=2, topk_group=1,
                         routed_scaling_factor=2.0, **SIGMOID)
    u = tokens()
    router.train()
    out = router(u)
    out.gates_TK.sum().backward()
    router.settle_bias_update(apply=True)
    assert router.gate.weight.grad is not None and router.e_score_correction_bias.abs().max() == 1e-2
    router.eval()
    with torch.no_grad():
        routing = router(u)
    torch.testing.assert_close(routing.gates_TK.sum(-1), torch.full((64,), 2.0))  # normalised, then x 2
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(64))
    assert bool((routing.expert_ids_TK // 4 == routing.expert_ids_TK[:, :1] // 4).all())  # one kept group of 4


@pytest.mark.parametrize("name, fields", [("temperature", dict(eval_mode="topk", temperature=0.5)),
                                          ("mc_dropout", dict(dropout=0.0, samples=4))])
@pytest.mark.parametrize("groups", [dict(), dict(n_group=4, topk_group=2)])
def test_topk_overlap_counts_against_the_selection_with_the_bias_and_the_kept_groups(name, fields, groups):
    """A router that selects deterministically on its (tempered) scores plus the bias, inside the kept
    groups, chooses exactly what that selection chooses: overlap 1, though plain Top-K of the logits
    differs on many tokens."""
    router = make_router(name, k=2, **fields, **groups, **SIGMOID).eval()
    u = tokens(256)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, N_EXPERTS))
        routing = router(u)
        plain_TK = router.gate(u).topk(2, dim=-1).indices.sort(-1).values
    assert float(routing.stats["topk_overlap"]) == 1.0
    assert (plain_TK != routing.expert_ids_TK.sort(-1).values).any(-1).float().mean() > 0.05


def test_the_variational_mean_is_the_mean_of_the_sampled_sigmoids():
    router = make_router("variational", k=2, samples=16, sigma_init=0.7, **SIGMOID).eval()
    post = router.posterior(tokens())
    torch.manual_seed(3)
    got = post.mean_scores(16, scoring=router.scoring).mean_TE()
    # The chunked draw is (X, E, S), the vectorised one (S, T, E): the same law, not the same numbers;
    # with S = 20000 both are within 0.01 of the expectation.
    torch.manual_seed(3)
    many = post.mean_scores(20000, scoring=router.scoring).mean_TE()
    want = post.sample(20000).sigmoid().mean(0)
    torch.testing.assert_close(many, want, atol=0.01, rtol=0)
    assert got.shape == want.shape and bool(((got > 0) & (got < 1)).all())


def test_probit_mean_matches_monte_carlo_within_0_02():
    """MacKay's probit approximation of E[sigmoid(l)], l ~ N(mu, sigma^2), against a Monte Carlo
    mean of 200,000 draws (standard error under 0.0012): within 0.02 for sigma up to 3, and exact
    (to rounding) at mu = 0 and at sigma -> 0."""
    mu = torch.linspace(-4, 4, 17).repeat(6, 1)
    sigma = torch.tensor([1e-4, 0.3, 1.0, 1.5, 2.0, 3.0]).unsqueeze(-1).expand_as(mu)
    post = LogitPosterior(mu, torch.zeros_like(mu), sigma.log())
    probit = post.probit_mean_sigmoid()
    torch.manual_seed(0)
    mc = post.sample(200_000).sigmoid().mean(0)
    assert (probit - mc).abs().max() < 0.02
    torch.testing.assert_close(probit[0], mu[0].sigmoid(), atol=1e-6, rtol=0)
    torch.testing.assert_close(probit[:, 8], torch.full((6,), 0.5))
    # With T the same holds for l / T: E[sigmoid(l / 2)].
    torch.testing.assert_close(post.probit_mean_sigmoid(2.0), LogitPosterior(mu / 2, mu * 0, (sigma / 2).log())
                               .probit_mean_sigmoid())


def test_probit_routing_needs_no_samples_and_is_deterministic():
    router = make_router("variational", k=2, samples=8, sigma_init=1.0, sigmoid_mean="probit", **SIGMOID).eval()
    u = tokens()
    with torch.no_grad():
        first, second = router(u), router(u)
        expected = router.posterior(u).probit_mean_sigmoid()
    assert torch.equal(first.expert_ids_TK, second.expert_ids_TK)
    torch.testing.assert_close(first.probs_TE, expected / expected.sum(-1, keepdim=True))
    assert router.flops_per_token(8) < make_router("variational", k=2, **SIGMOID).flops_per_token(8)


def correlated_and_independent(mu_TE: torch.Tensor, sigma: float) -> tuple[LogitPosterior, LogitPosterior]:
    """Two posteriors with the same marginals N(mu_e, sigma^2): every expert's noise one shared draw
    (full covariance, L = sigma on the first column, a tiny diagonal), or independent (mean field)."""
    n_tokens, n_experts = mu_TE.shape
    chol = torch.zeros(n_tokens, n_experts, n_experts)
    chol[:, :, 0] = sigma  # l_e = mu_e + sigma * eps_0 (+ 1e-6 * eps_e): one draw shifts them all
    rest = torch.arange(1, n_experts)
    chol[:, rest, rest] = 1e-6
    log_diag = chol.diagonal(dim1=-2, dim2=-1).log()
    full = LogitPosterior(mu_TE, torch.zeros_like(mu_TE), log_diag, chol)
    diag = LogitPosterior(mu_TE, torch.zeros_like(mu_TE), torch.full_like(mu_TE, math.log(sigma)))
    return full, diag


def test_full_covariance_cannot_change_the_routing_mean_selection_but_changes_the_bma():
    """Sigmoid scores act element-wise: E[sigmoid(l_e)] depends on l_e's marginal alone, so two
    posteriors with the same marginals give the same averaged scores (exactly under probit, within
    Monte Carlo error under mc) and the same routing-mean selection. Their single samples differ:
    perfectly correlated noise shifts every logit alike and never reorders them, so every sample
    selects the mean's Top-K, while independent noise does reorder them: the BMA's S single-sample
    passes route differently. (Under softmax the same two posteriors give different mean scores.)"""
    torch.manual_seed(0)
    mu_TE = torch.randn(256, N_EXPERTS)
    full, diag = correlated_and_independent(mu_TE, sigma=1.5)
    torch.testing.assert_close(full.marginal_variance_TE(), diag.marginal_variance_TE(), atol=1e-6, rtol=1e-5)
    scoring = Scoring("sigmoid")
    assert torch.equal(full.probit_mean_sigmoid(), diag.probit_mean_sigmoid())
    mc_full = full.mean_scores(4000, scoring=scoring).mean_TE()
    mc_diag = diag.mean_scores(4000, scoring=scoring).mean_TE()
    assert (mc_full - mc_diag).abs().max() < 0.05
    top_TK = mu_TE.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(full.probit_mean_sigmoid().topk(2, dim=-1).indices.sort(-1).values, top_TK)
    # The BMA's single samples: the correlated posterior always selects the mean's Top-K.
    same_full = (full.sample(64).topk(2, dim=-1).indices.sort(-1).values == top_TK).all(-1).float().mean()
    same_diag = (diag.sample(64).topk(2, dim=-1).indices.sort(-1).values == top_TK).all(-1).float().mean()
    assert same_full == 1.0 and same_diag < 0.6
    # Under softmax, the mean scores see the correlation.
    softmax_full = full.mean_scores(4000).mean_TE()
    softmax_diag = diag.mean_scores(4000).mean_TE()
    assert (softmax_full - softmax_diag).abs().max() > 0.1


def test_averaging_keeps_the_bias_balanced_at_moderate_sigma_and_over_corrects_at_large():
    """The bias meets the averaged scores as it meets the deterministic ones (added to them; the same as
    adding it to every sample's scores, the mean being linear). Averaging pulls each score towards 1/2
    by a factor of about 1 / sqrt(1 + pi sigma^2 / 8) while the bias stays, so a bias balanced on the
    deterministic router keeps the variational router's load balanced while sigma is small against the
    logits' spread, and over-corrects (the favoured experts get less than their share) when it is large."""
    d_model, n_experts, n_tokens, k = 32, 16, 1024, 4
    torch.manual_seed(0)
    u = torch.randn(n_tokens, d_model) + 0.5
    weight = torch.randn(n_experts, d_model) * d_model ** -0.5
    weight[:4] += 0.15  # four experts every token favours

    def favoured_share_and_cv(router) -> tuple[float, float]:
        load_E = loads(router(u).expert_ids_TK, n_experts)
        return float(load_E[:4].sum() / load_E.sum()), float(load_E.std(unbiased=False) / load_E.mean())

    det = build_router(d_model, n_experts, router_config("topk", k=k, bias_update_speed=1e-3, **SIGMOID))
    with torch.no_grad():
        det.gate.weight.copy_(weight)
        unbalanced = favoured_share_and_cv(det.eval())
        det.train()
        for _ in range(1500):
            det(u)
            det.settle_bias_update(apply=True)
        balanced = favoured_share_and_cv(det.eval())
    assert unbalanced[0] > 0.7 and balanced[1] < 0.05
    shares = {}
    for sigma in (0.3, 4.0):
        torch.manual_seed(1)
        router = build_router(d_model, n_experts, router_config("variational", k=k, samples=32, sigma_init=sigma,
                                                                 **SIGMOID)).eval()
        with torch.no_grad():
            router.gate.weight.copy_(weight)
            router.e_score_correction_bias.copy_(det.e_score_correction_bias)
            shares[sigma] = favoured_share_and_cv(router)
    assert shares[0.3][1] < 0.1  # balanced, as the deterministic router is
    assert shares[4.0][0] < 0.2  # over-corrected: the four favoured experts get under their 0.25


def test_gumbel_top_1_draws_from_the_normalised_sigmoid_scores():
    router = make_router("temperature", k=1, temperature=1.0, **SIGMOID).eval()
    logits_E = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, 0.5, -0.5, 1.5])
    counts = torch.zeros(N_EXPERTS)
    torch.manual_seed(0)
    for _ in range(40):
        scaled_NE = logits_E.expand(2000, -1)
        perturbed = gumbel_perturbed(router.sampling_log_weights(scaled_NE, scaled_NE.sigmoid()))
        counts += loads(router.select(scaled_NE.sigmoid(), perturbed)[0])
    want = logits_E.sigmoid() / logits_E.sigmoid().sum()
    assert (counts / counts.sum() - want).abs().max() < 0.01  # 80,000 draws: standard error under 0.002
    # With a bias: in proportion to the scores plus the bias.
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(0.0, 0.4, N_EXPERTS))
    counts.zero_()
    for _ in range(40):
        scaled_NE = logits_E.expand(2000, -1)
        perturbed = gumbel_perturbed(router.sampling_log_weights(scaled_NE, scaled_NE.sigmoid()))
        counts += loads(router.select(scaled_NE.sigmoid(), perturbed)[0])
    corrected = logits_E.sigmoid() + router.e_score_correction_bias
    assert (counts / counts.sum() - corrected / corrected.sum()).abs().max() < 0.01


def test_mc_dropout_without_dropout_and_swag_before_collection_are_sigmoid_top_k():
    u = tokens()
    topk = make_router("topk", k=2, **SIGMOID).eval()
    for name, fields in (("mc_dropout", dict(dropout=0.0)), ("swag", {})):
        router = make_router(name, k=2, samples=3, **SIGMOID, **fields).eval()
        router.gate.load_state_dict(topk.gate.state_dict())
        with torch.no_grad():
            got, want = router(u), topk(u)
        assert torch.equal(got.expert_ids_TK, want.expert_ids_TK)
        torch.testing.assert_close(got.gates_TK, want.gates_TK)


def test_score_mean_keeps_normalised_samples_under_sigmoid():
    acc = ScoreMean(3, keep=True, scoring=Scoring("sigmoid"))
    logits_CET = torch.randn(3, N_EXPERTS, 5)
    acc.add_samples(logits_CET)
    torch.testing.assert_close(acc.mean_TE(), logits_CET.sigmoid().mean(0).T)
    samples_STE = acc.samples_STE()
    torch.testing.assert_close(samples_STE.sum(-1), torch.ones(3, 5))


@pytest.mark.slow
def test_sigmoid_study_quick_form(tmp_path, corpus_cache):
    """The softmax-against-sigmoid study end to end at CI size: both scorings trained, fine-tuned and
    given the variational router post hoc, the table with paired intervals and the load CV; a second
    invocation with the same --out trains nothing again."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "sigmoid_study.py"
    command = [sys.executable, str(script), "--quick", "--out", str(tmp_path / "study")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "study" / "table.md").read_text()
    assert "\n- commit: " in page and "Command: `python experiments/sigmoid_study.py --quick`" in page
    numbers = json.loads((tmp_path / "study" / "table.json").read_text())
    assert set(numbers) == {f"{s}/{r}" for s in ("softmax", "sigmoid")
                            for r in ("Top-K", "variational, routing mean", "variational, BMA")}
    assert "d_ece" not in numbers["softmax/Top-K"] and numbers["sigmoid/Top-K"]["against"] == "softmax Top-K"
    bma = numbers["sigmoid/variational, BMA"]
    assert bma["against"] == "sigmoid Top-K" and bma["d_ece"]["low"] <= bma["d_ece"]["high"]
    assert "d_auroc_far" in bma and bma["load_cv"] >= 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "train " not in again.stdout
