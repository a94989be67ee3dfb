"""BlackVIP's decoder written as products (Decoder.run) equals functional_call of the official layers, bit for bit."""
import pytest
import torch
from torch.func import functional_call

from bbpt.methods.blackvip import Decoder


@pytest.mark.parametrize("z_dim, size", [(128, 32), (768, 224), (64, 64)])
def test_decoder_run_equals_functional_call(z_dim, size):
    torch.manual_seed(0)
    a, b = Decoder(z_dim, size).train(), Decoder(z_dim, size).train()
    b.load_state_dict(a.state_dict())
    z = torch.randn(6, z_dim)
    for k in range(3):  # perturbed weights, as SPSA sends them; BatchNorm in train mode updates its statistics
        params = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in a.named_parameters()}
        with torch.no_grad():
            ref, fast = functional_call(a, params, (z,)), b.run(params, z)
        assert fast.shape == (6, 3, size, size) and torch.equal(fast, ref), (fast - ref).abs().max()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # running statistics and num_batches_tracked
    a.eval(), b.eval()
    params = dict(a.named_parameters())
    with torch.no_grad():
        assert torch.equal(b.run(params, z), functional_call(a, params, (z,)))
