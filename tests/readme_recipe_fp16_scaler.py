import torch, mtl_opt
from torch import nn
device = "cuda" if torch.cuda.is_available() else "cpu"
trunk, head_a, head_b = nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Linear(32, 1), nn.Linear(32, 3)
model = nn.ModuleList([trunk, head_a, head_b]).to(device)
opt = mtl_opt.MultiTaskOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                 mtl_opt.get_aggregator("nash_mtl"), shared_params=trunk)
scaler = torch.amp.GradScaler(device)
x, y, label = torch.randn(64, 8, device=device), torch.randn(64, 1, device=device), torch.randint(0, 3, (64,), device=device)
for step in range(100):
    with torch.autocast(device, dtype=torch.float16):
        z = trunk(x)
        losses = [nn.functional.mse_loss(head_a(z).float(), y), nn.functional.cross_entropy(head_b(z).float(), label)]
    opt.zero_grad()
    opt.backward(losses, grad_scaler=scaler)  # scaled backward pass, weights from the unscaled Gramian
    scaler.step(opt)  # unscales, skips the step on inf/NaN
    scaler.update()
print(scaler.get_scale())
