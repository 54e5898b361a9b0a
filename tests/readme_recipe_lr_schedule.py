import torch, mtl_opt
from torch import nn
trunk, head_a, head_b = nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Linear(32, 1), nn.Linear(32, 1)
model = nn.ModuleList([trunk, head_a, head_b])
opt = mtl_opt.MultiTaskOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                 mtl_opt.get_aggregator("cagrad"), shared_params=trunk)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)  # attaches to opt itself
x, y_a, y_b = torch.randn(64, 8), torch.randn(64, 1), torch.randn(64, 1)
for epoch in range(30):
    z = trunk(x)
    opt.zero_grad()
    opt.step([nn.functional.mse_loss(head_a(z), y_a), nn.functional.mse_loss(head_b(z), y_b)])
    sched.step()
print(sched.get_last_lr())  # [0.00125]: halved every 10 epochs
