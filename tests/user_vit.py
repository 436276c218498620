"""A small user ViT as a researcher writes one: a plain nn.Module, no timm attributes (tests import it).

`variant` picks the Python in its forward: "plain" (a loop over the blocks only, which torch.fx reads),
"export_all" (`len(x)`, `if x.shape[-1] > ...` and an assert, which torch.fx cannot read and torch.export can;
one model for the three, since each export takes tens of seconds on a loaded machine), and "data_if" (a branch
on the data, which torch.export refuses too, so only the hooks split it).
"""

from __future__ import annotations

import torch
from torch import nn


class UserViT(nn.Module):
    def __init__(self, variant: str = "plain", num_classes: int = 3, dim: int = 16, depth: int = 3,
                 patch: int = 8, prefix_tokens: int = 1) -> None:
        super().__init__()
        self.variant = variant
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, prefix_tokens, dim) * 0.1)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True) for _ in range(depth)
        )
        self.head = nn.Linear(dim, num_classes)
        self.pretrained_cfg = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x) if self.variant == "export_all" else x.shape[0]
        if self.variant == "export_all" and x.shape[-1] > 16:
            x = x * 1.0
        if self.variant == "export_all":
            assert x.shape[1] == 3, "expected RGB"
        if self.variant == "data_if" and bool(x.mean() > 100):
            x = x * 0.0
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(n, -1, -1), t], dim=1)
        for block in self.transformer.layers:
            t = block(t)
        return self.head(t[:, 0])


def create(num_classes: int | None = None, variant: str = "plain") -> UserViT:
    torch.manual_seed(0)
    return UserViT(variant, num_classes or 3).eval()


def create_data_if(num_classes: int | None = None) -> UserViT:
    return create(num_classes, "data_if")
