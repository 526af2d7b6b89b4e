"""transformers' experts switch on ERNIE 5.0 experts: every implementation it can select (its own "grouped_mm",
"batched_mm" and "eager", and our registered "ernie5_*" names) agrees with the reference, also with
sentinel (empty) slots from elastic top-k, and the model's default stays our registry's fastest back-end."""

import pytest
import torch
from experts_cases import assert_matches, make_case, run_with_grads

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from modeling_ernie5.kernels.cpu import sorted_experts_forward
from modeling_ernie5.moe import Ernie5Experts, Ernie5ExpertsSwitchMixin, Ernie5SparseMoeBlock, reference_experts_forward

HF_IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm", "ernie5_cpu", "ernie5_reference"]


def _experts(impl, gate_up, down):
    config = Ernie5Config(hidden_size=gate_up.shape[2], moe_intermediate_size=down.shape[2], num_experts=gate_up.shape[0])
    config._experts_implementation = impl
    experts = Ernie5Experts(config).to(gate_up.dtype)
    return experts


@pytest.mark.parametrize("routing", ["uniform", "sentinel"])
@pytest.mark.parametrize("impl", HF_IMPLEMENTATIONS)
def test_every_hf_experts_implementation_matches_reference(impl, routing):
    case = make_case(21, 32, 16, 4, 2, dtype=torch.float32, routing=routing, seed=4)
    experts = _experts(impl, case[1], case[2])

    def through_module(x, gate_up, down, idx, w):
        # The module owns its weights; route the test's leaves through it so their gradients are checked.
        experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(gate_up), torch.nn.Parameter(down)
        return experts(x, idx, w)

    def leaf_grads(x, gate_up, down, idx, w, upstream):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gate_up, down, w)]
        experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(leaves[1]), torch.nn.Parameter(leaves[2])
        out = experts(leaves[0], idx, leaves[3])
        grads = torch.autograd.grad(out, [leaves[0], experts.gate_up_proj, experts.down_proj, leaves[3]], upstream)
        return [out.detach(), *grads]

    want = run_with_grads(reference_experts_forward, *case)
    got = leaf_grads(*case)
    assert torch.isfinite(got[0]).all()
    assert_matches(got, want, rtol=2e-4, atol=2e-5)


def test_unknown_hf_implementation_raises():
    case = make_case(4, 16, 8, 2, 1, dtype=torch.float32)
    experts = _experts("does_not_exist", case[1], case[2])
    with pytest.raises(KeyError, match="does_not_exist"):
        experts(case[0], case[3], case[4])


def test_block_with_per_token_top_k_under_hf_grouped_mm():
    """Elastic top-k writes sentinel slots; transformers' grouped_mm must mask them rather than emit NaN."""
    config = Ernie5Config(hidden_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=3)
    torch.manual_seed(0)
    block = Ernie5SparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, 32)
    top_k = torch.tensor([1, 3])
    outs = {}
    for impl in ("eager", "grouped_mm", "ernie5_cpu"):
        config._experts_implementation = impl
        outs[impl] = block(x, top_k=top_k)[0]
    assert torch.isfinite(outs["grouped_mm"]).all()
    torch.testing.assert_close(outs["grouped_mm"], outs["eager"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["ernie5_cpu"], outs["eager"], rtol=1e-5, atol=1e-6)


def test_model_default_is_our_fastest_backend_and_from_pretrained_switches(tmp_path):
    torch.manual_seed(0)
    model = Ernie5ForCausalLM(Ernie5Config()).eval()
    assert model.get_experts_implementation() == {"": "eager"}  # i.e. Ernie5Experts.forward -> our registry
    assert model.config.experts_backend == "auto"
    calls = []
    experts = next(m for m in model.modules() if isinstance(m, Ernie5Experts))
    experts.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    default_logits = model(ids).logits
    assert calls
    model.save_pretrained(tmp_path)
    # transformers' own "grouped_mm" also needs the switch mixin (its model-file check); see the next test.
    for impl in ("ernie5_cpu", "ernie5_reference"):
        loaded = Ernie5ForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).eval()
        assert loaded.config._experts_implementation == impl
        torch.testing.assert_close(loaded(ids).logits, default_logits, rtol=1e-4, atol=1e-5)


def test_set_experts_implementation_switches_at_runtime(tmp_path):
    assert issubclass(Ernie5ForCausalLM, Ernie5ExpertsSwitchMixin)
    model = Ernie5ForCausalLM(Ernie5Config()).eval()
    assert model.get_experts_implementation() == {"": "eager"}
    model.save_pretrained(tmp_path)
    loaded = Ernie5ForCausalLM.from_pretrained(tmp_path, experts_implementation="grouped_mm").eval()
    assert loaded.get_experts_implementation() == {"": "grouped_mm"}
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    want = model(ids).logits
    for impl in ("ernie5_cpu", "grouped_mm", "batched_mm", "eager"):
        model.set_experts_implementation(impl)
        assert model.get_experts_implementation() == {"": impl}
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not supported"):
        model.set_experts_implementation("no_such_backend")


def test_auto_backend_resolves_to_sorted_cpu_kernel():
    from modeling_ernie5.moe import resolve_experts_backend

    assert resolve_experts_backend("auto", torch.zeros(1, 1)) is sorted_experts_forward
