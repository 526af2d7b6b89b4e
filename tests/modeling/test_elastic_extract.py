"""Sub-model extraction (modeling_ernie5/elastic.py, DESIGN.md §4): a cut model equals the masked parent, experts
are chosen by measured usage, the config records its origin, and the result saves, loads and runs as remote code.
CPU, tiny sizes."""


import pytest
import torch

from modeling_ernie5 import ElasticSpec, Ernie5Config, Ernie5ForCausalLM
from modeling_ernie5.elastic import (
    evenly_spaced_layers,
    extract_submodel,
    measure_expert_usage,
    parameter_counts,
    submodel_spec,
)

VOCAB = 512


def parent_model(num_layers=5, seed=0):
    torch.manual_seed(seed)
    model = Ernie5ForCausalLM(Ernie5Config.from_preset("tiny", num_hidden_layers=num_layers)).eval()
    for router in model.model.routers():  # a trained-looking balancing bias, so keeping / resetting it matters
        router.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def ids(b=2, l=12, seed=1):
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))


def test_evenly_spaced_layers_keep_first_and_last():
    assert evenly_spaced_layers(4, 3) in {(0, 1, 3), (0, 2, 3)}
    assert evenly_spaced_layers(16, 12)[0] == 0 and evenly_spaced_layers(16, 12)[-1] == 15
    assert len(evenly_spaced_layers(16, 12)) == 12
    assert evenly_spaced_layers(5, 5) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="cannot keep"):
        evenly_spaced_layers(4, 5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_extracted_submodel_equals_masked_parent(top_k):
    parent = parent_model()
    child = extract_submodel(parent, layers=(0, 2, 4), experts=[1, 3, 4, 6], top_k=top_k).eval()
    spec = submodel_spec(child.config)
    assert spec.layers == (0, 2, 4) and spec.expert_mask.tolist() == [i in (1, 3, 4, 6) for i in range(8)]
    x = ids()
    with torch.no_grad():
        want = parent(x, elastic_spec=spec, output_routing_indices=True)
        got = child(x, output_routing_indices=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    # the same experts were chosen: parent indices map through the kept list
    kept = torch.tensor([1, 3, 4, 6])
    for sub_idx, parent_idx in zip(got.routing_indices, want.routing_indices):
        assert torch.equal(torch.sort(kept[sub_idx], -1).values, torch.sort(parent_idx, -1).values)
    # the balancing bias is cut and reset: a masked parent routes without it
    assert child.config.elastic_source["correction_bias"] == "reset to 0"
    assert all(r.e_score_correction_bias.abs().sum() == 0 for r in child.model.routers())


def test_depth_only_cut_keeps_bias_and_equals_parent_with_skipped_layers():
    parent = parent_model()
    child = extract_submodel(parent, layers=(0, 3, 4)).eval()
    x = ids()
    with torch.no_grad():
        want = parent(x, elastic_spec=ElasticSpec(layers=(0, 3, 4))).logits
        got = child(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        child.model.routers()[1].e_score_correction_bias, parent.model.routers()[3].e_score_correction_bias
    )


def test_experts_chosen_by_usage_and_per_layer_cut_matches_parent_by_replay():
    parent = parent_model()
    # make experts 5, 6, 7 unreachable in every layer: a full-model router never selects them
    for router in parent.model.routers():
        router.e_score_correction_bias[5:] = -10.0
    calib = ids(4, 16, seed=3)
    usage = measure_expert_usage(parent, calib, ElasticSpec(layers=(0, 2, 4)))
    assert all(u[5:].sum() == 0 for path, u in usage.items() if path in {"model.layers.0.mlp", "model.layers.2.mlp"})
    # The MTP block runs only in training; its router is still measured: every (token, slot) of the calibration
    # batch is counted (4 x 16 tokens, top-2 here), as in the backbone's layers.
    assert usage["mtp.0.block.mlp"].round().sum() == usage["model.layers.0.mlp"].round().sum() > 0
    child = extract_submodel(parent, layers=(0, 2, 4), num_experts=4, calibration_data=calib).eval()
    experts = child.config.elastic_source["experts"]
    assert set(experts) == {"model.layers.0.mlp", "model.layers.2.mlp", "model.layers.4.mlp", "mtp.0.block.mlp"}
    for path in ("model.layers.0.mlp", "model.layers.2.mlp", "model.layers.4.mlp"):
        want = torch.sort(torch.topk(usage[path], 4).indices).values.tolist()
        assert experts[path] == want and max(want) < 5
    # per-layer sets differ in general, so compare with the parent by replaying the child's routing on it
    x = ids()
    with torch.no_grad():
        got = child(x, output_routing_indices=True)
        replay = [torch.zeros_like(got.routing_indices[0])] * parent.config.num_hidden_layers
        for layer, idx in zip(child.config.elastic_source["layers"], got.routing_indices):
            replay[layer] = torch.tensor(experts[f"model.layers.{layer}.mlp"])[idx]
        want = parent(x, elastic_spec=ElasticSpec(layers=(0, 2, 4)), routing_indices=replay).logits
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-5)


def test_config_records_source_and_parameter_fractions():
    parent = parent_model(num_layers=4)
    child = extract_submodel(parent, layers=3, num_experts=4, top_k=1, calibration_data=ids(2, 16))
    cfg = child.config
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (3, 4, 1)
    src = cfg.elastic_source
    assert src["parent_num_hidden_layers"] == 4 and src["parent_num_experts"] == 8
    assert src["parent_num_experts_per_tok"] == 2 and src["layers"][0] == 0 and src["layers"][-1] == 3
    assert src["experts_chosen_by"] == "routing usage on calibration data"
    full, sub = parameter_counts(parent.config), parameter_counts(cfg)
    assert src["active_fraction"] == pytest.approx(sub["active"] / full["active"], abs=1e-6)
    assert src["total_fraction"] == pytest.approx(sub["total"] / full["total"], abs=1e-6)
    assert 0 < src["active_fraction"] < 1 and 0 < src["total_fraction"] < src["active_fraction"]
    n_params = sum(p.numel() for n, p in child.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    n_mtp = sum(p.numel() for n, p in child.named_parameters() if n.startswith("mtp."))
    assert n_params - n_mtp == src["total_params"]
    # a cut model trains like any other
    child.train()
    out = child(ids(), labels=ids())
    out.loss.backward()
    assert child.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_bad_arguments_name_the_problem():
    parent = parent_model(num_layers=4)
    with pytest.raises(ValueError, match="outside"):
        extract_submodel(parent, layers=(0, 7))
    with pytest.raises(ValueError, match="increasing"):
        extract_submodel(parent, layers=(2, 0))
    with pytest.raises(ValueError, match="calibration_data"):
        extract_submodel(parent, num_experts=4)
    with pytest.raises(ValueError, match="top_k"):
        extract_submodel(parent, experts=[0, 1], top_k=3)
    with pytest.raises(ValueError, match="not both"):
        extract_submodel(parent, num_experts=4, experts=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="input_ids"):
        extract_submodel(parent, num_experts=4, calibration_data=[{"ids": ids()}])
    with pytest.raises(ValueError, match="elastic_source"):
        submodel_spec(parent.config)


def test_cut_model_saves_loads_and_runs_as_remote_code(tmp_path, without_ernie5_packages):
    from transformers import AutoModelForCausalLM

    parent = parent_model(num_layers=4)
    child = extract_submodel(parent, layers=3, num_experts=4, top_k=1, calibration_data=ids(2, 16)).eval()
    save = tmp_path / "sub"
    child.save_pretrained(save)
    assert (save / "elastic.py").exists() and (save / "model.safetensors").exists()
    x = ids()
    with torch.no_grad():
        want = child(x).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save).eval()
    assert reloaded.config.elastic_source == child.config.elastic_source
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, want)
    torch.save(x, tmp_path / "ids.pt")
    torch.save(want, tmp_path / "want.pt")
    stdout = without_ernie5_packages(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        assert m.config.num_experts == 4 and m.config.elastic_source["parent_num_experts"] == 8
        x = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, want)
        print("OK", m.config.elastic_source["active_fraction"])
        """,
        tmp_path,
    )
    assert f"OK {child.config.elastic_source['active_fraction']}" in stdout


def test_usage_tie_break_stays_below_one_assignment_over_many_batches():
    """The combine-weight tie-break must never outrank a whole assignment, however many calibration batches there
    are: the whole part of every usage is the expert's number of assignments (tokens x top-k in total)."""
    parent = parent_model(num_layers=2)
    calib = [ids(1, 3, seed=s) for s in range(40)]  # few tokens per batch (3: MTP needs them): large tie-breaks
    usage = measure_expert_usage(parent, calib)
    k = parent.config.num_experts_per_tok
    assert "mtp.0.block.mlp" in usage
    for path, u in usage.items():
        assert u.floor().sum() == 40 * 3 * k, path
        assert (u - u.floor()).sum() < 1, path
