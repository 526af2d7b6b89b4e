"""Elastic sampling rules (training/elastic_sampler.py, DESIGN.md §4) and the elastic training step: paper
probabilities and ranges, grouping into one backward, determinism per step, and balancing statistics taken only
from full-configuration samples. CPU, tiny sizes."""

import pytest
import torch

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from training.elastic_sampler import ElasticSampler, SampleDraw


def config(**overrides):
    return Ernie5Config.from_preset("tiny", num_hidden_layers=6, **overrides)


def test_draws_follow_the_paper_probabilities_and_ranges():
    cfg = config()
    sampler = ElasticSampler(cfg, seed=0, anchor_full=False)
    n = depth = width = sparse = full = 0
    for step in range(150):
        for g in sampler.plan(64, step):
            for d in g.draws:
                n += 1
                depth += d.depth_reduced
                width += d.width_reduced
                sparse += d.top_k is not None
                full += d.is_full
                if d.top_k is not None:
                    assert 1 <= d.top_k <= cfg.num_experts_per_tok - 1
            if g.spec is None:
                continue
            if g.spec.layers is not None:
                assert g.spec.layers[0] == 0 and g.spec.layers[-1] == 5, "first and last layers are protected"
                assert len(g.spec.layers) < 6, "a reduced-depth sample drops at least one layer"
            if g.spec.expert_mask is not None:
                assert cfg.elastic_min_experts <= int(g.spec.expert_mask.sum()) <= cfg.num_experts - 1
    assert depth / n == pytest.approx(0.25, abs=0.02)
    assert width / n == pytest.approx(0.20, abs=0.02)
    assert sparse / n == pytest.approx(0.20, abs=0.02)
    assert full / n == pytest.approx(0.75 * 0.8 * 0.8, abs=0.02)  # the three axes are drawn independently


def test_interior_layers_are_retained_with_the_configured_probability():
    sampler = ElasticSampler(config(elastic_layer_retain_prob=0.5), seed=1)
    kept = [len(sampler.draw_layers(torch.Generator().manual_seed(s))) - 2 for s in range(2000)]
    # 4 interior layers, each kept with p=0.5 (mean 2); when all 4 survive (p=1/16) one is dropped
    assert sum(kept) / len(kept) == pytest.approx(2 - 1 / 16, abs=0.06)
    assert max(kept) == 3 and min(kept) == 0


def test_groups_partition_the_batch_full_group_last_and_anchor():
    sampler = ElasticSampler(config(), seed=0)
    for step in range(40):
        groups = sampler.plan(16, step)
        rows = sorted(r for g in groups for r in g.rows)
        assert rows == list(range(16))
        assert len(groups) <= 5
        assert groups[-1].is_full and 0 in groups[-1].rows, "the anchor sample is full and runs last"
        assert all(not g.is_full for g in groups[:-1])
        for g in groups[:-1]:
            # one forward per group: all rows share the layer set and the expert mask; top-k may differ per row
            assert len({(d.depth_reduced, d.width_reduced) for d in g.draws}) == 1
            if g.spec.top_k is not None:
                assert g.spec.top_k.shape == (len(g.rows),)


def test_plan_depends_only_on_seed_step_micro_step_and_rank():
    a, b = ElasticSampler(config(), seed=3), ElasticSampler(config(), seed=3)

    def sig(groups):
        return [(g.rows, None if g.spec is None else (g.spec.layers, g.spec.expert_mask, g.spec.top_k)) for g in groups]

    def same(x, y):
        return repr(sig(x)) == repr(sig(y))

    assert same(a.plan(16, 7, 1, 0), b.plan(16, 7, 1, 0))
    plans = [a.plan(16, 7, 0, 0), a.plan(16, 8, 0, 0), a.plan(16, 7, 1, 0), a.plan(16, 7, 0, 1)]
    assert sum(same(plans[0], p) for p in plans[1:]) == 0
    assert not same(a.plan(16, 7), ElasticSampler(config(), seed=4).plan(16, 7))


def test_disabled_sampler_and_shapes_without_room_to_shrink():
    groups = ElasticSampler(config(), enabled=False).plan(8, 0)
    assert len(groups) == 1 and groups[0].is_full and groups[0].rows == list(range(8))
    # 2 layers (both protected), 2 experts at top-2 (min subset = top-k), min top-k = top-k: nothing can shrink
    tiny = Ernie5Config.from_preset(
        "tiny", num_hidden_layers=2, num_experts=2, num_experts_per_tok=2, elastic_min_top_k=2
    )
    assert all(g.is_full for step in range(10) for g in ElasticSampler(tiny, anchor_full=False).plan(8, step))
    assert SampleDraw(top_k=1).kinds == ("sparsity",) and SampleDraw().kinds == ("full",)
    assert SampleDraw(depth_reduced=True, width_reduced=True).kinds == ("depth", "width")
    with pytest.raises(ValueError, match="batch_size"):
        ElasticSampler(config()).plan(0, 0)


def test_elastic_config_fields_are_validated():
    assert Ernie5Config().elastic_min_experts == 4 and Ernie5Config().elastic_min_top_k == 1
    with pytest.raises(ValueError, match="elastic_min_experts"):
        Ernie5Config(elastic_min_experts=9)
    with pytest.raises(ValueError, match="elastic_min_top_k"):
        Ernie5Config(elastic_min_top_k=3)
    with pytest.raises(ValueError, match="elastic_layer_retain_prob"):
        Ernie5Config(elastic_layer_retain_prob=1.5)
    with pytest.raises(ValueError, match="elastic_source"):
        Ernie5Config(elastic_source=[1, 2])


def _trainer(tmp_path, model, sampler):
    from datasets import Dataset

    from training.pretrain import ElasticTrainer, PretrainConfig

    data = Dataset.from_dict({"input_ids": torch.randint(0, 512, (16, 24)).tolist()})
    args = PretrainConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=8)
    return ElasticTrainer(model=model, args=args, train_dataset=data, sampler=sampler)


def test_balancing_statistics_come_only_from_full_configuration_samples(tmp_path):
    torch.manual_seed(0)
    cfg = config()
    model = Ernie5ForCausalLM(cfg)
    sampler = ElasticSampler(cfg, seed=0)
    trainer = _trainer(tmp_path, model, sampler)
    x = torch.randint(0, 512, (16, 24), generator=torch.Generator().manual_seed(5))
    step = next(s for s in range(50) if len(sampler.plan(16, s)) >= 3)  # a micro-batch with several sub-models
    groups = sampler.plan(16, step)
    full_rows = groups[-1].rows
    assert 0 < len(full_rows) < 16
    trainer._micro = (step, 0)
    model.train()
    for r in model.model.routers():
        r.expert_load.zero_()
    loss = trainer.compute_loss(model, {"input_ids": x, "labels": x})
    assert loss.requires_grad
    counted = torch.stack([r.expert_load.clone() for r in model.model.routers()])
    model.eval()
    with torch.no_grad():  # same weights and bias: the full rows' routing, replayed outside training
        out = model(x[full_rows], output_routing_indices=True)
    want = torch.stack([torch.bincount(idx.flatten(), minlength=8)[:8].float() for idx in out.routing_indices])
    torch.testing.assert_close(counted, want)
    assert counted.sum() == len(full_rows) * 24 * cfg.num_experts_per_tok * cfg.num_hidden_layers
    # the trainer's logged load statistics see the same counts
    torch.testing.assert_close(trainer._load_counts.float(), want.double().float())

    # a micro-batch with no full-configuration sample leaves the statistics untouched
    for r in model.model.routers():
        r.expert_load.zero_()
    model.train()
    no_anchor = ElasticSampler(cfg, seed=0, anchor_full=False)
    trainer.sampler = no_anchor
    step = next(s for s in range(500) if not any(g.is_full for g in no_anchor.plan(2, s)))
    trainer._micro = (step, 0)
    trainer.compute_loss(model, {"input_ids": x[:2], "labels": x[:2]})
    assert all(r.expert_load.sum() == 0 for r in model.model.routers())


def test_elastic_loss_is_the_token_weighted_sum_of_group_losses(tmp_path):
    torch.manual_seed(0)
    cfg = config(num_nextn_predict_layers=0)
    model = Ernie5ForCausalLM(cfg)
    sampler = ElasticSampler(cfg, seed=2)
    trainer = _trainer(tmp_path, model, sampler)
    x = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(6))
    step = next(s for s in range(50) if len(sampler.plan(8, s)) >= 2)
    trainer._micro = (step, 0)
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": x, "labels": x})
    want = 0.0
    with torch.no_grad():
        for g in sampler.plan(8, step):
            want += model(x[g.rows], labels=x[g.rows], elastic_spec=g.spec).loss * len(g.rows) / 8
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
