"""optim: the MIMO optimizer core.

Per-module optimizers on per-module grids (`NativeModuleOptimizer` over any torch.optim optimizer,
with optional ZeRO-1 sharded state), driven as one by `MimoOptimizer`: a global grad norm across
module boundaries, clipping with it, overflow and success consensus, one loss scale, and
module-keyed state in model-space shards that mimo_ckpt saves and reshards.
`optim.megatron.MegatronModuleOptimizer` (imported on demand: it needs megatron-core and a GPU)
drives a megatron-core optimizer as one module.
"""

from .groups import GROUP_DIMS, ModuleGroups, build_module_groups, peer_rank_lists
from .loss_scale import ConstantLossScaler, DynamicLossScaler
from .mimo import MimoOptimizer, ModuleOptimizer
from .native import NativeModuleOptimizer
from .params import ShardedParam

__all__ = [
    "GROUP_DIMS", "ModuleGroups", "build_module_groups", "peer_rank_lists",
    "ConstantLossScaler", "DynamicLossScaler", "MimoOptimizer", "ModuleOptimizer",
    "NativeModuleOptimizer", "ShardedParam",
]
