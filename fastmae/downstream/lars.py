"""LARS (layer-wise adaptive rate scaling) as the reference's ``util/lars.py``, used by its linear probe.

For weight matrices (ndim > 1) the update (gradient + weight decay) is rescaled to
``trust_coefficient * ||w|| / ||update||`` of its size before SGD momentum; biases and norm
parameters get plain momentum SGD.
"""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                update = p.grad
                if update is None:
                    continue
                if p.ndim > 1:  # not a bias or a norm parameter
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one),
                        one,
                    )  # a tensor op, not .item(): no host sync
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss
