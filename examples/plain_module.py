"""Delta tuning a plain nn.Module of your own: no transformers, no config, names are all it needs."""

import torch
from torch import nn

from opendelta import AdapterModel, LoraModel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


torch.manual_seed(0)
net = Net()
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
original = net(x).detach()

lora = LoraModel(net, modified_modules=["encoder.0", "encoder.2"], lora_r=4)   # full paths
adapter = AdapterModel(net, modified_modules=["encoder.2"], bottleneck_dim=4,
                       dummy_inputs=(torch.zeros(1, 8),))  # runtime init: one dummy forward learns the width 16
lora.freeze_module(exclude=["deltas"])
optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
for _ in range(50):
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(f"loss after 50 steps: {loss.item():.3f}")

lora.detach()
adapter.detach()
assert torch.equal(net(x), original)
print("both deltas detached: the network is bit for bit the original")
