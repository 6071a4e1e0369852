"""`--recipe diffssl`: the paper's heads and training, checked against the paper's own structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cache.errors import ConfigError
from stages.extract.plan import ExtractConfig
from stages.extract.run import run_extract
from stages.probe.banks import FlatBank
from stages.probe.diffssl import DiffSSLAttention
from stages.probe.heads import load_probe
from stages.probe.plan import Rows, Samples, epoch_schedule
from stages.probe.recipes import recipe_lr
from stages.probe.run import run_probe
from stages.probe.settings import ProbeSettings

from helpers import make_image_folder


# -- the paper's head, rebuilt from its published structure (soumik-kanad/diffssl) ----------------------
class PaperAttention(nn.Module):  # ssl_diff/attention_head.py: Attention(dim, num_heads, qkv_bias=False)
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class PaperMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PaperBlock(nn.Module):  # Block(dim, num_heads, mlp_ratio=4.): pre-norm, drop_path = identity
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), PaperAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), PaperMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PaperFusion(nn.Module):
    """ssl_diff/attention_fusion.py, norm_type "layer", fusion_arc
    "Use_CLS_Token:True:1024,Insert_CLS_Token,Attention:1024:8:4:2,Extract_CLS_Token"."""

    def __init__(self, blocks, t_list, dims, sizes, num_classes, *, dim=1024, heads=8, depth=2, pre_pool_size=16):
        super().__init__()
        pre = {}
        for b in blocks:
            size = min(sizes[b], pre_pool_size)
            pre[str(b)] = nn.Sequential(
                nn.AdaptiveAvgPool2d(size), nn.LayerNorm([dims[b], size, size]), nn.Conv2d(dims[b], dim, 1)
            )
        self.pre_layer = nn.ModuleDict(pre)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[PaperBlock(dim, heads, 4.0) for _ in range(depth)])
        self.head = nn.Linear(dim * len(t_list), num_classes)
        self.block_list, self.t_list = list(blocks), list(t_list)

    def forward(self, feats):  # feats[t_idx][b_idx]: (B, C, H, W)
        out = []
        for t_idx in range(len(self.t_list)):
            tokens = [
                self.pre_layer[str(b)](feats[t_idx][i]).flatten(2).transpose(1, 2)
                for i, b in enumerate(self.block_list)
            ]
            x = torch.cat(tokens, dim=1)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            out.append(self.blocks(x)[:, 0])
        return self.head(torch.cat(out, dim=1))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_attention_head_matches_the_papers_parameter_count_and_layers():
    """d = 1024 on a 1024 x 16 x 16 input (block 24 of ADM-256 pooled to 16), 1000 classes: about 27.8M."""
    with torch.device("meta"):
        ours = DiffSSLAttention([(1024, 16)], 1000, dim=1024, depth=2, heads=8)
        paper = PaperFusion([24], [150], {24: 1024}, {24: 16}, 1000)
    assert count(ours) == count(paper) == 27_786_216
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())  # noqa: E731
    assert shapes(ours) == shapes(paper)
    assert not any(name.endswith("qkv.bias") for name, _ in ours.named_parameters())
    assert len(ours.blocks) == 2 and ours.head.in_features == 1024


def copy_paper_weights(paper: PaperFusion, ours: DiffSSLAttention) -> None:
    state = {}
    for name, value in paper.state_dict().items():
        if name.startswith("pre_layer."):
            _, block, index, rest = name.split(".", 3)
            name = f"pre_layer.{paper.block_list.index(int(block))}.{int(index) - 1}.{rest}"  # no pool module
        state[name] = value
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize("blocks, t_list", [([24], [150]), ([19, 24, 30], [90, 150])])
def test_attention_head_and_fusion_compute_the_papers_function(blocks, t_list):
    dims, sizes = {19: 24, 24: 16, 30: 8}, {19: 4, 24: 4, 30: 2}
    torch.manual_seed(0)
    paper = PaperFusion(blocks, t_list, dims, sizes, 7, dim=32, heads=4, pre_pool_size=16).eval()
    with torch.no_grad():
        paper.cls_token.normal_()  # zero at init: give it a value so that it is checked too
    inputs = [(dims[b], sizes[b]) for b in blocks for _ in t_list]  # block-major, as a fused Combo lists them
    ours = DiffSSLAttention(inputs, 7, dim=32, depth=2, heads=4, steps=len(t_list)).eval()
    copy_paper_weights(paper, ours)
    feats = [[torch.randn(5, dims[b], sizes[b], sizes[b]) for b in blocks] for _ in t_list]
    flat = [feats[ti][bi] for bi in range(len(blocks)) for ti in range(len(t_list))]
    with torch.no_grad():
        torch.testing.assert_close(ours(*flat), paper(feats), rtol=1e-5, atol=1e-5)


def test_recipe_settings_and_explicit_overrides():
    s = ProbeSettings(store="x", head="linear", recipe="diffssl")
    assert (s.epochs, s.batch_size, s.lrs, s.weight_decays, s.optimizer, s.halving) == (
        28,
        128,
        (1e-2,),
        (0.0,),
        "sgd",
        False,
    )
    assert ProbeSettings(store="x", head="linear", recipe="diffssl", epochs=5, lrs=(0.1,)).epochs == 5
    a = ProbeSettings(store="x", head="attention", recipe="diffssl")
    assert a.spec.name == "diffssl-attention" and (a.lrs, a.dim, a.attention_heads, a.depth) == ((5e-2,), 1024, 8, 2)
    assert ProbeSettings(store="x", head="linear").batch_size == 256  # the project's own defaults are unchanged
    assert ProbeSettings(store="x", head="mlp", recipe="diffssl").run_name == "mlp_diffssl"
    with pytest.raises(ConfigError, match="recipe"):
        ProbeSettings(store="x", head="knn", recipe="diffssl")


def test_recipe_batches_drop_the_last_partial_batch():
    labels = np.zeros(300, np.int64)
    samples = Samples(
        Rows("train", labels, np.arange(300)),
        Rows("train", labels, np.arange(0)),
        Rows("val", labels, np.arange(3)),
        64,
    )
    windows = epoch_schedule(samples, 100, 128, 0, 0, drop_last=True)
    sizes = [len(b) for w in windows for b in w.batches]
    assert sizes == [128, 128]
    assert sorted(np.concatenate([b for w in windows for b in w.batches]).tolist()) != list(range(256))  # shuffled


def test_default_init_is_nn_linears():
    bank = FlatBank([400], 1, 10, seeds=[[3]], default_init=True)
    weight = bank.weights[0].detach()
    bound = 1 / 400**0.5
    assert weight.abs().max() <= bound and weight.std() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert bank.biases[0].abs().max() <= bound and bank.biases[0].abs().max() > 0


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data = make_image_folder(root / "data", counts={"train": 40, "val": 12})
    out = root / "s.zarr"
    run_extract(
        ExtractConfig(
            model=str(tiny_model),
            data=str(data),
            out=str(out),
            blocks=(3,),
            timesteps=(10,),
            pools=(1, 4),
            chunk_samples=16,
        ),
        progress=False,
    )
    return out


def test_linear_recipe_schedule_and_raw_features(store, tmp_path):
    result = run_probe(
        ProbeSettings(store=str(store), head="linear", recipe="diffssl", pools=(1,), batch_size=8, out=str(tmp_path))
    )
    assert len(result.rows) == 1 and result.record["recipe"] == "diffssl" and result.record["epochs"] == 28
    config = json.loads((result.run_dir / "heads" / "b3_t10_p1.json").read_text())
    expected = [recipe_lr(1e-2, e) for e in range(28)]
    assert config["lr_per_epoch"] == pytest.approx(expected)
    assert config["lr_per_epoch"][6] == pytest.approx(1e-2) and config["lr_per_epoch"][7] == pytest.approx(1e-3)
    assert config["lr_per_epoch"][27] == pytest.approx(1e-5)
    probe, _ = load_probe(result.run_dir / "heads" / "b3_t10_p1")
    assert torch.equal(probe.mean0, torch.zeros_like(probe.mean0)) and torch.equal(
        probe.std0, torch.ones_like(probe.std0)
    )
    assert result.record["settings"]["optimizer"] == "sgd" and result.record["settings"]["weight_decays"] == (0.0,)


def test_attention_recipe_trains_the_papers_head(store, tmp_path):
    result = run_probe(
        ProbeSettings(
            store=str(store),
            head="attention",
            recipe="diffssl",
            pools=(4,),
            batch_size=8,
            epochs=2,
            dim=16,
            attention_heads=2,
            out=str(tmp_path),
        )
    )
    probe, config = load_probe(result.run_dir / "heads" / "b3_t10_p4")
    assert config["kind"] == "diffssl-attention" and isinstance(probe.head, DiffSSLAttention)
    assert config["lr_per_epoch"] == pytest.approx([5e-2, 5e-2])
