"""UFF contrastive fusion pretraining (spec §7.4) on the dumps of ``main.py --save_feature``.

    python fusion_pretrain.py --data_path datasets/patch_lib --batch_size 16 --accum_iter 16 --lr 0.003
    torchrun --nproc_per_node=N fusion_pretrain.py ...
    python -m torch.distributed.launch --nproc_per_node=N fusion_pretrain.py ...

See docs/uff_pretraining.md; the work is done by ``m3dm.uff.pretrain``.
"""

import logging
import sys

from m3dm.uff.pretrain import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # rank 0's progress messages, on stderr
    sys.exit(main())
