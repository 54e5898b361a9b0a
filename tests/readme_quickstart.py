import torch, mtl_opt
from torch import nn
trunk = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU())
head_reg, head_cls = nn.Linear(32, 1), nn.Linear(32, 3)
model = nn.ModuleList([trunk, head_reg, head_cls])
opt = mtl_opt.MultiTaskOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                 mtl_opt.get_aggregator("came_grad"), shared_params=trunk)
x, y, label = torch.randn(64, 8), torch.randn(64, 1), torch.randint(0, 3, (64,))
for step in range(200):
    z = trunk(x)
    losses = [nn.functional.mse_loss(head_reg(z), y), nn.functional.cross_entropy(head_cls(z), label)]
    opt.zero_grad()
    info = opt.step(losses, task_weights=[1, 4])  # the CAME-Grad authors' ω = [1, 4]
print(info)  # the losses, CAME-Grad's weights β and the per-task gradient norms
