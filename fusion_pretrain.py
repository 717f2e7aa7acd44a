"""UFF contrastive fusion pretraining under torch.distributed (not built yet: see the UFF issue)."""

import sys

if __name__ == "__main__":
    sys.exit("fusion_pretrain.py: UFF pretraining is not implemented yet")
