import pytest
import torch

from tpo.registry import build_projector


@pytest.mark.parametrize("cfg,tokens", [
    (dict(type="LinearProjector"), 16),
    (dict(type="MLPProjector", hidden_dim=12), 16),
    (dict(type="PoolingProjector", tokens_per_frame=4), 4),
    (dict(type="PoolingProjector", tokens_per_frame=(1, 2)), 2),
])
def test_projector_shapes_and_gradients(cfg, tokens):
    projector = build_projector(dict(cfg, in_dim=8, out_dim=10))
    x = torch.randn(2, 3, 16, 8, requires_grad=True)
    y = projector(x, grid_size=(4, 4))
    assert y.shape == (2, 3, tokens, 10)
    assert projector.num_output_tokens(16, (4, 4)) == tokens
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in projector.parameters())


def test_pooling_projector_averages_each_quadrant():
    projector = build_projector(dict(type="PoolingProjector", in_dim=1, out_dim=1, tokens_per_frame=4))
    grid = torch.arange(16.0).reshape(1, 1, 16, 1)  # a 4x4 grid, row-major
    pooled = []
    projector.mlp = torch.nn.Identity()
    pooled = projector(grid, grid_size=(4, 4)).flatten().tolist()
    assert pooled == [2.5, 4.5, 10.5, 12.5]


def test_projector_errors():
    with pytest.raises(ValueError, match="not a square number"):
        build_projector(dict(type="PoolingProjector", in_dim=2, out_dim=2, tokens_per_frame=3))
    projector = build_projector(dict(type="PoolingProjector", in_dim=2, out_dim=2))
    with pytest.raises(ValueError, match="with_cls=False"):
        projector(torch.randn(1, 1, 17, 2), grid_size=None)
    linear = build_projector(dict(type="LinearProjector", in_dim=2, out_dim=2))
    with pytest.raises(ValueError, match="in_dim matches"):
        linear(torch.randn(1, 1, 4, 3))
    with pytest.raises(ValueError, match="projector.in_dim"):
        build_projector(dict(type="LinearProjector", in_dim=0, out_dim=2))
