"""optim: the MIMO optimizer core (per-module optimizers, global grad norm, module-keyed state)."""
