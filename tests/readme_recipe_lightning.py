import lightning as L, torch, mtl_opt
from torch import nn

class TwoTasks(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False  # MultiTaskOptimizer runs the backward pass
        self.trunk, self.head_a, self.head_b = nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Linear(32, 1), nn.Linear(32, 3)

    def training_step(self, batch, batch_idx):
        x, y, label = batch
        z = self.trunk(x)
        losses = [nn.functional.mse_loss(self.head_a(z), y), nn.functional.cross_entropy(self.head_b(z), label)]
        opt = self.optimizers()
        opt.zero_grad()
        opt.step(losses=losses, clip_norm=1.0)  # keyword arguments reach MultiTaskOptimizer.step
        self.log_dict({"loss_a": losses[0], "loss_b": losses[1]})

    def configure_optimizers(self):
        return mtl_opt.MultiTaskOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2),
                                          mtl_opt.get_aggregator("came_grad"), shared_params=self.trunk)

data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randn(256, 1), torch.randint(0, 3, (256,)))
trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(TwoTasks(), torch.utils.data.DataLoader(data, batch_size=64))
print(trainer.global_step, trainer.logged_metrics)
