import torch, mtl_opt
from torch import nn
trunk, head_a, head_b = nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Linear(32, 1), nn.Linear(32, 1)
model = nn.ModuleList([trunk, head_a, head_b])
opt = mtl_opt.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                 mtl_opt.get_aggregator("came_grad"), shared_params=trunk)
x, y_a, y_b = torch.randn(64, 8), 100 * torch.randn(64, 1), torch.randn(64, 1)
for step in range(50):
    z = trunk(x)
    opt.zero_grad()
    # clip after aggregation: the shared direction and the heads' gradients, every entry into [-0.1, 0.1]
    opt.step([nn.functional.mse_loss(head_a(z), y_a), nn.functional.mse_loss(head_b(z), y_b)],
             clip_value=0.1)  # or clip_norm=1.0: one total norm over them
print(opt.last_grad_norm)  # the total gradient norm before clipping
